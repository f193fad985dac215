"""The gRPC PredictionService server."""
