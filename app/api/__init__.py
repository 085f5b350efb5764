"""HTTP plumbing every lens shares: dependencies, streaming, errors, middleware, auth, metrics."""
