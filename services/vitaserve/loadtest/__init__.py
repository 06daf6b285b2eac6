"""Load test: concurrent phone-like calls against a gateway; first-audio latency and capacity."""
