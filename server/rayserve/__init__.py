"""Quiver on Ray Serve: an OpenAI ingress routing each adapter's requests to the replicas that hold it,
in front of N replicas that each run `quiver serve`'s engine and HTTP app (`quiver ray serve`)."""
