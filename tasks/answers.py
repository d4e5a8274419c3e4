"""Teacher forcing for answers of several tokens ("full" answer scoring).

A prompt whose answer has tokens ``a_0 .. a_{m-1}`` becomes ``m`` prompts: ``prompt + the answer
text of a_0..a_{s-1}`` for ``s = 0..m-1``, each scored on its last token predicting ``a_s``. The
expanded prompts are ordinary task rows (the answer-token rule holds for each), so every executor
and the CAMA build take them unchanged; a source prompt counts as right only when all of its rows
are right.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from .store import FEATURES, task_fingerprint, task_metadata
from .tokens import encoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The expanded data set's columns besides :data:`tasks.store.COLUMNS`.
EXPANSION_FEATURES = datasets.Features({"source_row": datasets.Value("int64"),
                                        "answer_step": datasets.Value("int64")})


def expand_answer_prefixes(dataset: datasets.Dataset, tokenizer: "PreTrainedTokenizerBase"
                           ) -> datasets.Dataset:
    """One row per answer token of every prompt of a task data set (teacher forcing).

    Row ``(i, s)`` (source row ``i``, answer step ``s``): ``prompt`` is row ``i``'s prompt plus
    the shortest text prefix of its answer that tokenizes to its first ``s`` answer tokens;
    ``answer`` the rest of the answer text; ``answer_token_id`` the token ``a_s`` to predict;
    ``answer_token_ids`` ``a_s..``; ``input_ids`` the source's ids plus ``a_0..a_{s-1}`` (checked
    against the tokenizer); ``source_row`` ``i`` and ``answer_step`` ``s``. Rows are ordered by
    source row, then step. Single-token answers give the source row itself (step 0).

    Raises:
        ValueError: an answer whose first ``s`` tokens no prefix of its text produces (the
            tokenizer merges across them); score such a task on its first answer token.
    """
    rows = dataset.to_dict()
    encode = encoder(tokenizer)
    # Candidate texts: every proper character prefix of every multi-token answer.
    candidates = [(i, c) for i, ids in enumerate(rows["answer_token_ids"]) if len(ids) > 1
                  for c in range(1, len(rows["answer"][i]))]
    encoded = dict(zip(candidates, encode([rows["prompt"][i] + rows["answer"][i][:c]
                                            for i, c in candidates])))
    columns: dict[str, list] = {name: [] for name in list(FEATURES) + list(EXPANSION_FEATURES)}
    for i, answer_ids in enumerate(rows["answer_token_ids"]):
        prompt, answer, prompt_ids = rows["prompt"][i], rows["answer"][i], rows["input_ids"][i]
        cut = 0  # characters of the answer moved into the prompt
        for step in range(len(answer_ids)):
            ids = prompt_ids + answer_ids[:step]
            if step:
                cut = next((c for c in range(cut + 1, len(answer))
                            if encoded[(i, c)] == ids), None)
                if cut is None:
                    raise ValueError(
                        f"answer {answer!r} of prompt {prompt!r}: no prefix of its text tokenizes "
                        f"to its first {step} answer token(s), so it cannot be teacher-forced; "
                        f"score it on its first answer token instead")
            for name in FEATURES:
                columns[name].append(rows[name][i])
            columns["prompt"][-1] = prompt + answer[:cut]
            columns["answer"][-1] = answer[cut:]
            columns["answer_token_id"][-1] = answer_ids[step]
            columns["answer_token_ids"][-1] = answer_ids[step:]
            columns["input_ids"][-1] = ids
            columns["n_tokens"][-1] = len(ids)
            columns["source_row"].append(i)
            columns["answer_step"].append(step)
    record = {**task_metadata(dataset), "answer_scoring": "full",
              "expanded_from": task_fingerprint(dataset), "n_source_rows": len(dataset),
              "n_rows": len(columns["prompt"])}
    features = datasets.Features({**FEATURES, **EXPANSION_FEATURES})
    info = datasets.DatasetInfo(description=json.dumps(record, sort_keys=True), features=features)
    table = pa.table(columns, schema=features.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=info)
