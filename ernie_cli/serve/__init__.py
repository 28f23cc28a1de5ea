"""`ernie serve`: OpenAI's completions API over the batched engine (runtime/batch.py).

app.py (routes, validation, responses), protocol.py (the API's fields and shapes), scheduler.py
(continuous batching), server.py (start-up, the KV pool's size, signals), client.py (`ernie complete
--server`, which imports no torch). Importing this package imports nothing else.
"""
