"""AF1 on NDIF: session requests, reductions on the server, the self-check on arrival, faults,
byte accounting.

NDIF runs nnsight traces on models it hosts (Llama-3.1-8B, 70B, 405B, ...). What travels is the
source of a ``with`` block plus the values it references; what comes back is only what the block
saves. This package packs AF1's work into few, small requests:

* **One trace site** (``trace_site.py``). Every request is a session sent from the same block;
  what differs is data and the per-trace and final functions shipped by value (``steps.py``).
  A server that never resets nnsight's source caches (older NDIF) then still runs them all,
  and a content-addressed file name keeps two versions of this toolkit apart there.
* **Sessions.** :class:`~.executor.RemoteExecutor` sends ``cells_per_request`` configurations x
  every prompt batch as one request (one queue wait), not one per trace, and halves a request
  until it fits the byte budget.
* **Reductions where the activations are.** Evaluation saves the argmax id and the answer's logit
  per prompt (never logits); the CAMA build accumulates the grouped float64 sums on the server
  and downloads only the sums.
* **Self-check on arrival** (``selfcheck.py``): one small request checks on the server that the
  masks and the CAMA write do what they should before a long job.
* **Faults** (``faults.py``, ``client.py``): HTTP 413 and NDIF's execution time-out split a
  request, deterministic job errors stop at once with one line (a model NDIF will not load on
  demand names its family's hosted models), others are retried with jittered backoff (longer
  for 503), a silent websocket or a job NDIF no longer knows is given up and resubmitted, as are
  expired result links, an overall client time-out applies, and the ledger (``ledger.py``) keeps
  finished results and job ids so a rerun (also after Ctrl-C) resumes. Whatever comes back is
  checked before use (``received.py``: detached, on the CPU, dtype and shape).
* **Accounting.** Bytes up and down per request, in :class:`~.client.RemoteStats`, for the
  manifest.

``backend="local"`` runs every request through the same client path, but the server is this
machine running NDIF's own code (``ndif_server.py``; the ``ndif`` package, required for it)
with this package unimportable, as on NDIF: by default the path an ordinary key takes there,
NDIF's sandbox (the block in a runner process, the forward pass here), or the trusted in-process
path. This is the offline test of everything here. Before anything is sent, ``preflight.py``
checks the key, versions and the hosted model; ``dryrun.py`` runs a job's requests through the
executor with a transport that measures them and sends nothing; ``audit.py`` lists what a
request makes the server import.
"""
