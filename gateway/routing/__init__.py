"""Several engines: their live load, the routing policies, the breakers and the retry budget."""
