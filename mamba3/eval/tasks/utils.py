"""Document functions of the offline tasks; same behaviour as lm-eval 0.4.13's hellaswag/utils.py
and winogrande/preprocess_winogrande.py (re-implemented here so the task folder is self-contained)."""
import re


def _hs_clean(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artefacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hs_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hs_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(one)


def winogrande_doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_doc_to_choice(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + opt for opt in (doc["option1"], doc["option2"])]
