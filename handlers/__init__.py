"""One module per topic: validate, write a batch in one statement, name the cache keys."""
