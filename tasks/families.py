"""Built-in non-arithmetic task families, generated offline (the paper's open question: is the
short burst of cross-token reading special to mental math?).

* ``capitals`` (style ``recall``): factual recall, ``The capital of {country} is`` ->
  `` {capital}``, from the table shipped in ``tasks/data/capitals.csv`` (80 countries and their
  capitals, as listed in Wikipedia's "List of national capitals"). The answer depends on a token read from
  earlier in the prompt (the country) and on knowledge stored in the model.
* ``ioi`` (style ``names``): name copying in the indirect-object form, e.g. ``When Mary and John
  went to the store, John gave a book to`` -> `` Mary``: the answer is a name that occurs earlier
  in the prompt and is picked by which name was repeated, a dependency between three earlier
  positions and no stored fact. Three templates; the data set's ``template`` column groups CAMA
  by template (:func:`tasks.records.cama_groups`).

Both go through :func:`tasks.records.build_from_records`, so the answer-token rule, the sink rule
and sampling are those of every task.
"""

from __future__ import annotations

import csv
import io
import itertools
from importlib import resources
from typing import TYPE_CHECKING

from .arithmetic import TaskBuild
from .records import build_from_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CAPITALS_TEMPLATE = "The capital of {country} is"

# All start with the same word, so the sink is that word on tokenizers without BOS; the first two
# have the same shape (and often the same token length), which only template groups tell apart.
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {B} gave a {thing} to",
    "When {A} and {B} got to the {place}, {B} handed a {thing} to",
    "When {A} and {B} had a long day at the {place}, {B} passed a {thing} to",
)
IOI_NAMES = ("Mary", "John", "Anna", "James", "Sarah", "David", "Emma", "Michael", "Laura",
             "Robert", "Alice", "Thomas", "Kate", "Daniel", "Lucy", "Peter")
IOI_PLACES = ("store", "park", "school", "station")
IOI_THINGS = ("book", "drink", "key", "letter")

#: Family task name -> its style name (rows carry ``task`` and ``style`` like arithmetic tasks).
FAMILIES = {"capitals": "recall", "ioi": "names"}


def capitals_table() -> list[tuple[str, str]]:
    """``(country, capital)`` pairs of the shipped table, in file order."""
    text = resources.files("tasks").joinpath("data/capitals.csv").read_text(encoding="utf-8")
    return [(row["country"], row["capital"]) for row in csv.DictReader(io.StringIO(text))]


def capital_records() -> tuple[list[str], list[str]]:
    """Prompts and answers of ``capitals`` (the answer is `` {capital}``, space included)."""
    pairs = capitals_table()
    return ([CAPITALS_TEMPLATE.format(country=c) for c, _ in pairs],
            [" " + capital for _, capital in pairs])


def ioi_records() -> tuple[list[str], list[str], list[str]]:
    """Prompts, answers (`` {A}``) and templates of ``ioi``: every template, ordered pair of
    distinct names, place and thing (3 x 16 x 15 x 4 x 4 = 11,520 rows)."""
    prompts, answers, templates = [], [], []
    for template, (a, b), place, thing in itertools.product(
            IOI_TEMPLATES, itertools.permutations(IOI_NAMES, 2), IOI_PLACES, IOI_THINGS):
        prompts.append(template.format(A=a, B=b, place=place, thing=thing))
        answers.append(" " + a)
        templates.append(template)
    return prompts, answers, templates


def build_family(tokenizer: "PreTrainedTokenizerBase", task: str, n_prompts: int | None = None,
                 seed: int = 0) -> TaskBuild:
    """The data set of a built-in family (:data:`FAMILIES`), sampled like the arithmetic tasks."""
    if task == "capitals":
        prompts, answers = capital_records()
        templates = None
        source = {"family": task, "table": "tasks/data/capitals.csv",
                  "template": CAPITALS_TEMPLATE}
    elif task == "ioi":
        prompts, answers, templates = ioi_records()
        source = {"family": task, "names": len(IOI_NAMES), "places": len(IOI_PLACES),
                  "things": len(IOI_THINGS)}
    else:
        raise ValueError(f"unknown task family {task!r}; families: {', '.join(FAMILIES)}")
    return build_from_records(tokenizer, prompts, answers, task=task, style=FAMILIES[task],
                              templates=templates, n_prompts=n_prompts, seed=seed, source=source)
