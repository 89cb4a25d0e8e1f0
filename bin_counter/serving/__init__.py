"""What a logged model ships and every caller of a model uses: the served pyfunc (`model`), its request limits
(`limits`), the clients that send it photos (`clients`), model logging (`packaging`) and a scoring server that
bounds requests (`server`). It imports neither the CLI nor the commands nor the cloud adapters, and none of torch
at import: a model logged for CPU serving ships this package and the torch-free core it uses (`packaging.
SERVED_CORE`), and its environment holds no torch."""
