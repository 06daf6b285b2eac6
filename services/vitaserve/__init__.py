"""VITA-Audio serving stack (import name `vitaserve`)."""
