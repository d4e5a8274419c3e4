"""The one trace site: every remote request of a job is sent from :func:`run_traces`.

Why one site. A request ships the source of its ``with`` block, and the server finds a nested
``with lm.trace(...)`` by file name and line in that source, caching what it read (nnsight's
source caches). A server that never resets those caches (older NDIF) looks the nested trace of
a second kind of request up in the first kind's source and fails with
``WithBlockNotFoundError``. From one site every request ships the same text; requests differ
only in data and in the functions that list the traces, run in each and finish (``steps.py``,
shipped by value).

Why a content-addressed file name. ``executor.py`` compiles this file's text under
``<path>@<sha256 of the text>`` (registered in ``linecache``), so two versions of this toolkit
with different texts never share a cache entry on such a server, where the second would
otherwise silently run the first one's nested block. Keep other code out of this file.

No comment, blank line or multi-line statement inside the block: nnsight ships it re-formatted
(``ast.unparse``) and finds the nested trace by its line number.
"""

import torch


def run_traces(lm, sites, backend, traces, step, finish, state):
    """One request: ``step(sites, state, extra)`` inside a trace of each ``(encoding, extra)`` of
    ``traces(state)``, then ``finish(state)``, whose saved value comes back as ``"result"``.

    ``state`` travels with the request; the traces are listed on the server, so a value used by
    many traces is uploaded once. The inner ``no_grad`` runs on the server too (NDIF adds none),
    so no autograd graph grows across the session. Returns the backend's decoded saves, or
    ``None`` for a backend that only serializes (the dry run).
    """
    with torch.no_grad(), lm.session(backend=backend):
        with torch.no_grad():
            for enc, extra in traces(state):
                with lm.trace(enc):
                    step(sites, state, extra)
            result = finish(state)
    return getattr(backend, "result", None)
