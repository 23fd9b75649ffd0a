"""CodeScaler Serve: requests, batching and HTTP; no tensors in this package."""
