"""LongBench (Bai et al. 2023, arXiv 2308.14508) from the user's own JSONL files.

The data is not downloaded here: the user points at a folder of LongBench-format files named
``<task>.jsonl`` (or LongBench-E's ``<task>_e.jsonl``), one JSON object per line with the fields
``input``, ``context``, ``answers``, ``length``, ``dataset``, ``language``, ``all_classes``, ``_id``.
Prompts, generation lengths, the middle truncation, the tasks left without a chat template and
the metric of each task follow THUDM/LongBench's ``pred.py``, ``eval.py`` and ``config/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from uncomp_cli.errors import UncompError
from uncomp_cli.eval.examples import Example
from uncomp_cli.models.prompting import build_prompt_ids

#: LongBench's ``config/dataset2prompt.json``: the benchmark's prompt format, as data.
PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer "
        "the question asconcisely as you can, using a single phrase if possible. Do not provide "
        "any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely "
        "as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
        "{input}\n\nAnswer:"),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be answered "
        "based on the information in the article, write \"unanswerable\". If the question is a yes/no "
        "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n"
        "\nArticle: {context}\n\n Answer the question based on the above article as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be answered "
        "based on the information in the article, write \"unanswerable\". If the question is a yes/no "
        "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n"
        "\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不"
        "要输出任何其他字词。\n\n问题：{input}\n回答："),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question "
        "based on the given passages. Only give me the answer and do not output any other words.\n"
        "\nQuestion: {input}\nAnswer:"),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question "
        "based on the given passages. Only give me the answer and do not output any other words.\n"
        "\nQuestion: {input}\nAnswer:"),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not output "
        "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question "
        "based on the given passages. Only give me the answer and do not output any other words.\n"
        "\nQuestion: {input}\nAnswer:"),
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
        "问题：{input}\n回答："),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n"
        "\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer "
        "the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query "
        "based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n"
        "\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n"
        "会议总结："),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n"
        "\n{context}\n{input}"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output "
        "any other words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n{input}"),
    "lsht": (
        "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there are "
        "after removing duplicates. In other words, how many non-repeating paragraphs are there "
        "in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
        "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n"
        "\nThe final answer is: "),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease "
        "enter the number of the paragraph that the abstract is from. The answer format must be "
        "like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: "),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n"
        "\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n"
        "\n答案是："),
    "lcc": (
        "Please complete the code given below. \n{context}Next line of code:\n"),
    "repobench-p": (
        "Please complete the code given below. \n{context}{input}Next line of code:\n"),
}
TASKS = tuple(PROMPTS)

#: LongBench's ``config/dataset2maxlen.json``: tokens to generate per task.
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

#: LongBench's ``dataset2metric`` (eval.py), as keys of :data:`uncomp_cli.eval.metrics.METRICS`.
METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_l_zh",
    "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "vcsum": "rouge_l_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l", "lsht": "classification",
    "passage_retrieval_en": "retrieval", "passage_count": "count", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim", "repobench-p": "code_sim",
}

#: Few-shot and code completion: LongBench gives these the raw text, as chat models do better without a template.
RAW_TASKS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
#: LongBench scores only the first line of the answer on these few-shot tasks (the model continues the pattern).
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")
CLASSIFICATION_TASKS = tuple(t for t, m in METRIC.items() if m == "classification")
#: Fields every line must have; ``length``, ``dataset`` and ``language`` are only reported, so may be absent.
REQUIRED_FIELDS = ("input", "context", "answers", "_id")
#: LongBench's ``model2maxlen`` for a 4k model (llama2-7b-chat-4k), a safe default.
DEFAULT_MAX_LENGTH = 3500


def load_examples(data_dir, tokenizer, tasks=None, max_length: int = DEFAULT_MAX_LENGTH, limit: int | None = None,
                  context_length: int | None = None) -> list[Example]:
    """Examples of every ``<task>.jsonl`` in ``data_dir`` (or only ``tasks``), in file order.

    ``max_length`` bounds the whole prompt, chat template included; with ``context_length`` (the
    model's) it also leaves room for each task's answer. Longer prompts lose their middle, as in
    LongBench. ``limit`` keeps the first lines of each file.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise UncompError(f"LongBench folder not found: {folder}")
    if tasks is None:
        files = sorted(folder.glob("*.jsonl"))
        if not files:
            raise UncompError(f"no .jsonl files in {folder} (LongBench files are named <task>.jsonl, "
                              "e.g. hotpotqa.jsonl)")
        names = [f.stem for f in files]
    else:
        names = list(tasks)
    for name in names:
        if _dataset(name) not in PROMPTS:
            raise UncompError(f"unknown LongBench task {name!r}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UncompError(f"--limit must be at least 1, got {limit}")
    examples = []
    for name in names:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise UncompError(f"no {path.name} in {folder}")
        dataset = _dataset(name)
        budget = max_length if context_length is None else min(max_length, context_length - MAX_NEW_TOKENS[dataset])
        if budget < 1:
            raise UncompError(f"{name}: no room for a prompt: --max-length {max_length}, "
                              f"context {context_length}, {MAX_NEW_TOKENS[dataset]} tokens to generate")
        seen: set[str] = set()
        for line_no, record in _records(path, limit):
            where = f"{path.name} line {line_no}"
            _check(record, dataset, where)
            if record["_id"] in seen:
                raise UncompError(f"{where}: duplicate _id {record['_id']!r}")
            seen.add(record["_id"])
            prompt = PROMPTS[dataset].format(context=record["context"], input=record["input"])
            ids, truncated = _prompt_ids(tokenizer, prompt, dataset in RAW_TASKS, budget, where)
            examples.append(Example(
                id=f"{name}-{record['_id']}", task=name, prompt_ids=tuple(ids), answers=tuple(record["answers"]),
                metric=METRIC[dataset], max_new_tokens=MAX_NEW_TOKENS[dataset], length=budget,
                meta={"dataset": dataset, "language": record.get("language"), "length": record.get("length"),
                      "all_classes": record.get("all_classes"), "_id": record["_id"], "truncated": truncated,
                      "first_line_only": dataset in FIRST_LINE_TASKS},
            ))
    return examples


def _dataset(name: str) -> str:
    """The LongBench dataset of a file stem: LongBench-E's ``hotpotqa_e`` is ``hotpotqa``."""
    return name[:-2] if name.endswith("_e") and name[:-2] in PROMPTS else name


def _records(path: Path, limit: int | None):
    """(line number, parsed object) for each non-blank line, up to ``limit`` of them."""
    count = 0
    try:
        with path.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UncompError(f"{path.name} line {line_no}: invalid JSON ({exc.msg})") from None
                yield line_no, record
                count += 1
                if limit is not None and count >= limit:
                    return
    except UnicodeDecodeError:
        raise UncompError(f"{path.name} is not UTF-8 text") from None
    if count == 0:
        raise UncompError(f"{path.name} has no examples")


def _check(record, dataset: str, where: str) -> None:
    if not isinstance(record, dict):
        raise UncompError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise UncompError(f"{where}: missing field {field!r}")
    for field in ("input", "context"):
        if not isinstance(record[field], str):
            raise UncompError(f"{where}: field {field!r} must be a string")
    answers = record["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise UncompError(f"{where}: field 'answers' must be a non-empty list of strings")
    if not isinstance(record["_id"], (str, int)):
        raise UncompError(f"{where}: field '_id' must be a string")
    classes = record.get("all_classes")
    if dataset in CLASSIFICATION_TASKS and not (isinstance(classes, list) and classes):
        raise UncompError(f"{where}: {dataset} needs 'all_classes', the list of class names its metric looks for")


def _prompt_ids(tokenizer, prompt: str, raw: bool, max_length: int, where: str) -> tuple[list[int], bool]:
    """The prompt's ids (chat template unless ``raw``), its middle cut so that they fit ``max_length``.

    As LongBench, the prompt text is cut in token space — the first and last halves of what
    fits are kept, decoded and joined — before the chat template goes around it; here the
    template's tokens count against ``max_length`` too.
    """
    ids = build_prompt_ids(tokenizer, prompt, raw=raw)
    if len(ids) <= max_length:
        return ids, False
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    room = max_length - (len(ids) - len(text_ids))  # what the template leaves for the text
    for _ in range(8):  # re-tokenising the joined halves may add a token or two at the seam
        if room < 2:
            raise UncompError(f"{where}: --max-length {max_length} leaves no room for the text after the "
                              "chat template")
        head = room // 2
        text = (tokenizer.decode(text_ids[:head], skip_special_tokens=True)
                + tokenizer.decode(text_ids[len(text_ids) - (room - head):], skip_special_tokens=True))
        ids = build_prompt_ids(tokenizer, text, raw=raw)
        if len(ids) <= max_length:
            return ids, True
        room -= len(ids) - max_length
    raise UncompError(f"{where}: could not cut the prompt to {max_length} tokens")
