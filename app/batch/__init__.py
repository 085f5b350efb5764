"""`python -m app.batch`: experiments, weight-diff jobs and diffing scans as Ray Data pipelines.

The same job specs as the HTTP routes, cut into blocks that an actor pool of engines (one per GPU,
each with the pair loaded once) runs through the server's own library code; the driver commits
each block once, in order, into the server's store layout under `--out`.
"""
