"""The only code that knows about grpcio and the bridge thread."""
