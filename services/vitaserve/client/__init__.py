"""Clients of the public Conversation service: the phone-like caller (`vita-audio call`, the load
test) and a scripted caller (the integration tests). Product code never imports them."""
