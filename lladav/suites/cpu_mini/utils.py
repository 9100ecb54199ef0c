"""lmms-eval hooks of the cpu_mini tasks (lladav/suites/__init__.py writes the task YAMLs that
name them): documents are lines of docs.jsonl written beside this file from a lladav test set,
scored by lladav.evaluate.score, the same rule `lladav eval` applies."""

from lladav.evaluate import score


def doc_to_visual(doc):
    return list(doc["images"])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    correct, _ = score(results[0], doc["expected"], doc["scoring"], doc["choices"] or None)
    return {"accuracy": float(correct)}
