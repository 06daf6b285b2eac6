"""The development cluster: every service as a local process (`vita-audio up`, `loadtest --local`,
the integration tests), tiny checkpoints made on first use. Nothing in the product imports it."""
