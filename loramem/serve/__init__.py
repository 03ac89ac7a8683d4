"""`loramem serve`: a warm model answering from the caches, adapters and libraries under one folder, over HTTP.

`paths` confines every name a request gives to the root; `store` loads memories by name and keeps them fresh;
`engine` decodes every request's questions in one worker thread, joining requests over the same memory into one
batch; `app` is the HTTP front (FastAPI on uvicorn: the native `/v1/answers` and OpenAI's chat completions);
`client` is what `ask --server` sends, with no torch import. Importing this package imports none of them.
"""
