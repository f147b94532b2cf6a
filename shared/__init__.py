"""What server and client both need: data, phantom, models, losses, metrics, configuration.

Nothing here imports `server`, `client`, `strategies` or `simulations` (imports flow one way).
"""
