"""AF1 on NDIF: session requests, reductions on the server, retries, byte accounting.

NDIF runs nnsight traces on models it hosts (Llama-3.1-70B, 405B, ...). What travels is the
source of a ``with`` block plus the values it references; what comes back is only what the block
``.save()``\\ s. This module packs AF1's work into few, small requests:

* **Sessions.** :class:`RemoteExecutor` sends a chunk of ``cells_per_request`` configurations x
  every prompt batch as ONE ``model.session()`` request (one queue wait), not one per trace.
* **Reductions where the activations are.** Evaluation saves the argmax id and the answer's logit
  per prompt (never logits); the CAMA build (:meth:`RemoteClient.cama_runner`) accumulates the
  grouped float64 sums on the server and downloads only the sums.
* **Uploads.** Each CAMA layer a chunk needs is uploaded once per request, in the model's dtype,
  as its own tensor (a view of the table would pickle the whole table's storage).
* **Faults.** Network errors, job errors and time-outs are retried with bounded exponential
  backoff; with a ``ledger`` directory finished results and job ids are kept on disk, so a
  rerun resumes, and requests can be submitted without waiting and collected later.
* **Accounting.** Bytes up (the serialized request) and down (the result blob as received) per
  request, in :class:`RemoteStats`, for the manifest.

``backend="local"`` runs every request through the same client path, but the "server" is this
process: the request is serialized exactly as for NDIF, deserialized with the project's modules
hidden (nnsight's ``remote="local"`` rule), executed in a fresh thread the way NDIF's worker does
(saves collected from the block's frame) and its result encoded as NDIF encodes it. This is the
offline test of everything here.

Server rules (see :func:`audit_request`): code that runs inside a trace may import only
:data:`PERMITTED_MODULES`; the request itself references nnsight's own runtime
(:data:`RUNTIME_MODULES`). NDIF runs models in bfloat16 with ``device_map="auto"`` and requires
the client's nnsight version to equal the server's (``preflight.py``).
"""

