"""Serving on Ray Serve: OpenAI-compatible ingress, guard, router (canary / shadow / drift / failover)
and LLM replicas."""
