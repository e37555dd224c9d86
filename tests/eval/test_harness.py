"""glmkit eval: packed multiple-choice scoring against separate sequences, batching, the readers and their
errors, sliding-window perplexity, EM/F1, and the shipped tasks on the demo model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from glmkit.cli import main
from glmkit.eval.metrics import exact_match_score, f1_score, normalize_answer
from glmkit.eval.scoring import pack, part_a, score_packed
from glmkit.eval.shipped import build_tasks
from glmkit.eval.task_config import TaskConfigError, load_task, parse_task, resolve_tasks, shipped_task_names
from glmkit.eval.task_data import Document, LastWordItem, Reader, TaskDataError, csv_rows, read_choice_items
from glmkit.eval.tasks import Run, last_word, perplexity, windows

from tiny import GMASK, MASK, SOP, random_model, tiny_config, write_chat_model

CONTEXT = [10, 11, 12, 13, 14, 15, 16]
CHOICES = [[20, 21, 22], [30], [40, 41], [50, 51, 52, 53]]


@pytest.fixture(scope="module", params=["2d", "1d"])
def model(request):
    return random_model(tiny_config(position_encoding_2d=request.param == "2d"))


def alone(model, sequence: list[int], start: int, answer: list[int]) -> float:
    """An answer's summed log-probability in a sequence of its own, positions and mask as the model derives them."""
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float().log_softmax(-1)
    return sum(float(logits[start + i, token]) for i, token in enumerate(answer))


@pytest.mark.parametrize("gmask", [False, True])
@pytest.mark.parametrize("choices", [CHOICES, [[7], [8], [9]]], ids=["multi-token", "single-token"])
def test_packed_choices_score_as_separate_sequences(model, gmask, choices):
    a = part_a(CONTEXT, model.special_ids, gmask)
    assert a == [*CONTEXT, GMASK if gmask else MASK]
    [packed] = score_packed(model, [pack(a, choices, model.special_ids, model.position_layout)])
    for choice, score in zip(choices, packed, strict=True):
        expected = alone(model, [*a, SOP, *choice[:-1]], len(a), choice)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.tokens == len(choice)


def test_blank_in_the_middle_of_the_context(model):
    """A context holding [MASK] keeps it there; the answers take that mask's position."""
    context = [10, 11, MASK, 12, 13]
    a = part_a(context, model.special_ids, gmask=False)
    assert a == context
    [packed] = score_packed(model, [pack(a, CHOICES, model.special_ids, model.position_layout)])
    for choice, score in zip(CHOICES, packed, strict=True):
        assert score.logprob == pytest.approx(alone(model, [*a, SOP, *choice[:-1]], len(a), choice), abs=1e-4)


def test_packing_does_not_let_choices_see_each_other(model):
    """Changing one choice leaves the others' scores alone."""
    special, layout = model.special_ids, model.position_layout
    a = part_a(CONTEXT, special, False)
    first = score_packed(model, [pack(a, CHOICES, special, layout)])[0]
    changed = score_packed(model, [pack(a, [CHOICES[0], [31, 32, 33], *CHOICES[2:]], special, layout)])[0]
    for i in (0, 2, 3):
        assert changed[i].logprob == pytest.approx(first[i].logprob, abs=1e-5)
    assert changed[1].logprob != pytest.approx(first[1].logprob, abs=1e-3)


def test_batched_rows_score_as_unbatched(model):
    special, layout = model.special_ids, model.position_layout
    rows = [pack(part_a(CONTEXT[:n], special, n % 2 == 0), CHOICES[: 2 + n % 3], special, layout) for n in range(1, 7)]
    batched = score_packed(model, rows)
    for row, scores in zip(rows, batched, strict=True):
        single = score_packed(model, [row])[0]
        assert [s.logprob for s in scores] == pytest.approx([s.logprob for s in single], abs=1e-4)
        assert [s.greedy for s in scores] == [s.greedy for s in single]


def test_windows_score_every_token_once():
    tokens = list(range(100, 1100))
    pairs = windows(tokens, max_length=64, stride=16)
    scored = [t for _, s in pairs for t in s]
    assert scored == tokens
    for context, part in pairs[1:]:
        assert len(context) + 1 + len(part) <= 64  # context, [gMASK], <sop> + part[:-1]
        assert len(context) == 64 - 1 - 16
    with pytest.raises(TaskConfigError, match="generation-length"):
        windows(tokens, max_length=16, stride=15)


def test_perplexity_of_one_window_is_the_sequence_loss(model):
    tokens = [(7 * i) % 200 + 20 for i in range(40)]
    config = parse_task({"name": "t", "type": "lm", "path": "x.txt"}, Path("t.yaml"))
    run = Run(model, None, config, batch_size=2, max_length=model.config.max_sequence_length, progress=False)
    tally = perplexity(run, [Document(tokens, words=10, bytes=100)], "test")
    expected = -alone(model, [GMASK, SOP, *tokens[:-1]], 1, tokens)
    assert tally["nll"] == pytest.approx(expected, rel=1e-5)
    assert tally["tokens"] == 40
    # Sliding windows score the same tokens; the later ones see less context than the whole text.
    small = Run(model, None, config, batch_size=3, max_length=24, progress=False)
    config.generation_length = 8
    windowed = perplexity(small, [Document(tokens, words=10, bytes=100)], "test")
    assert windowed["tokens"] == 40 and math.isfinite(windowed["nll"]) and windowed["nll"] != tally["nll"]


def test_exact_match_and_f1():
    assert normalize_answer("The capital of France is Paris!") == "capital of france is paris"
    assert exact_match_score("the capital is Paris.", "Capital is paris") == 1.0
    assert exact_match_score("巴黎。", "巴黎") == 1.0
    assert f1_score("41 + 53 = 94.", "41 + 53 = 95.") == pytest.approx(2 / 3)  # 2 of 3 numbers agree
    assert f1_score("93加86等于179。", "93加86等于178。") == pytest.approx(5 / 6)  # characters count as words
    assert f1_score("nothing", "else") == 0.0


# ----- files, YAML, CLI -----

MMLU_QUESTIONS = [
    ("What is the capital of France?", "Paris", "Rome", "Berlin", "Madrid"),
    ("Which number is prime?", "4", "6", "7", "9"),
    ("Which animal barks?", "cat", "dog", "cow", "fish"),
    ("What colour is the sky?", "green", "red", "blue", "black"),
]


@pytest.fixture(scope="module")
def chat_model_dir(tokenizer, tmp_path_factory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("model"), tokenizer)


def mmlu_prompt(question: str, options: tuple[str, ...], subject: str) -> str:
    """The documented zero-shot prompt, written out here independently of the harness."""
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n{question}\n"
            f"A. {options[0]}\nB. {options[1]}\nC. {options[2]}\nD. {options[3]}\nAnswer:")


def test_mmlu_csv_file(chat_model_dir, tokenizer, tmp_path):
    """An MMLU-layout CSV, answers set to the model's own picks (computed here alone) except one."""
    import glmkit

    model, tok = glmkit.load(chat_model_dir, progress=False)
    answers = []
    for question, *options in MMLU_QUESTIONS:
        context = tok.encode(mmlu_prompt(question, tuple(options), "general knowledge"), add_special_tokens=False)
        a = [*context, tok.mask_token_id]
        letters = [tok.encode(letter, add_special_tokens=False) for letter in "ABCD"]
        scores = [alone(model, [*a, tok.bos_token_id, *ids[:-1]], len(a), ids) for ids in letters]
        answers.append("ABCD"[max(range(4), key=scores.__getitem__)])
    answers[0] = next(letter for letter in "ABCD" if letter != answers[0])  # one wrong on purpose
    data = tmp_path / "mmlu"
    data.mkdir()
    wrong = [next(letter for letter in "ABCD" if letter != answer) for answer in answers[1:]]
    for name, rows in (("general_knowledge_test.csv", zip(MMLU_QUESTIONS, answers, strict=True)),
                       ("general_knowledge_val.csv", zip(MMLU_QUESTIONS[1:], wrong, strict=True))):
        with (data / name).open("w", encoding="utf-8") as f:
            for (question, *options), answer in rows:
                f.write(",".join(f'"{x}"' for x in (question, *options, answer)) + "\n")
    (tmp_path / "mmlu.yaml").write_text('name: "MMLU"\ntype: "mul"\npath: "mmlu"\nfile-pattern:\n'
                                        '  knowledge: "*_test.csv"\n  wrong: "*_val.csv"\nmicro-batch-size: 2\n',
                                        encoding="utf-8")
    out = tmp_path / "results.json"
    assert main(["eval", str(tmp_path / "mmlu.yaml"), "--model", str(chat_model_dir), "--json", str(out),
                 "--no-progress"]) == 0
    rows = {(r["group"], r["metric"]): r for r in json.loads(out.read_text())["results"]}
    assert rows[("knowledge", "accuracy")]["value"] == pytest.approx(75.0)
    assert rows[("knowledge", "accuracy")]["n"] == 4
    assert rows[("wrong", "accuracy")]["value"] == 0.0  # a score of 0 is still reported
    assert rows[("all", "accuracy")]["value"] == pytest.approx(100 * 3 / 7)


def test_ceval_csv_layout(tokenizer, tmp_path):
    path = tmp_path / "computer_network_val.csv"
    path.write_text("id,question,A,B,C,D,answer,explanation\n0,哪个是协议？,TCP,猫,狗,鱼,A,因为\n"
                    '1,"多行\n问题",一,二,三,四,C,\n', encoding="utf-8")
    rows = list(csv_rows(path))
    assert [r[2] for r in rows] == ["A", "C"] and rows[1][1][0] == "多行\n问题" and rows[0][3] is True
    items = read_choice_items(path, Reader(tokenizer))
    assert [i.label for i in items] == [0, 2]
    assert tokenizer.decode(items[0].context).startswith("以下是中国关于computer network考试的单项选择题")
    (tmp_path / "test.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match="no 'answer' column"):
        list(csv_rows(tmp_path / "test.csv"))


def test_few_shot_examples_come_from_the_dev_file(tokenizer, tmp_path):
    """MMLU's layout: data/dev/x_dev.csv solves the examples shown before data/test/x_test.csv's questions."""
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "dev" / "astronomy_dev.csv").write_text("Sun?,star,planet,moon,comet,A\nMars?,star,planet,moon,"
                                                        "comet,B\nLuna?,star,planet,moon,comet,C\n")
    (tmp_path / "test" / "astronomy_test.csv").write_text("Io?,star,planet,moon,comet,C\n")
    [item] = read_choice_items(tmp_path / "test" / "astronomy_test.csv", Reader(tokenizer), few_shot=2)
    expected = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                "Sun?\nA. star\nB. planet\nC. moon\nD. comet\nAnswer: A\n\n"
                "Mars?\nA. star\nB. planet\nC. moon\nD. comet\nAnswer: B\n\n"
                "Io?\nA. star\nB. planet\nC. moon\nD. comet\nAnswer:")
    assert item.context == tokenizer.encode(expected, add_special_tokens=False) and item.label == 2
    with pytest.raises(TaskDataError, match="fewer than few-shot 5"):
        read_choice_items(tmp_path / "test" / "astronomy_test.csv", Reader(tokenizer), few_shot=5)


def write_task(tmp_path: Path, yaml_text: str, data_name: str, data: str) -> Path:
    (tmp_path / data_name).write_text(data, encoding="utf-8")
    (tmp_path / "task.yaml").write_text(yaml_text, encoding="utf-8")
    return tmp_path / "task.yaml"


@pytest.mark.parametrize(("yaml_text", "data", "message"), [
    ("name: t\ntype: mul\npath: d.jsonl\n  bad: [indent\n", "", "task.yaml line"),
    ("name: t\ntype: classify\npath: d.jsonl\n", "", "unknown task type 'classify'"),
    ("name: t\ntype: mul\n", "", "missing key 'path'"),
    ("name: t\ntype: mul\npath: d.jsonl\nmicro-bach-size: 4\n", "", "unknown key(s) micro_bach_size"),
    ("name: t\ntype: mul\npath: nowhere\n", "", "does not exist"),
    ("name: t\ntype: mul\npath: d.jsonl\n", '{"inputs_pretokenized": "q", "choices_pretokenized": ["a", "b"], '
     '"label": 0}\n{"inputs_pretokenized": "q",\n', "d.jsonl:2: not valid JSON"),
    ("name: t\ntype: mul\npath: d.jsonl\n", '{"inputs_pretokenized": "q", "choices_pretokenized": ["a", "b"], '
     '"label": 2}\n', "d.jsonl:1: label must be the index"),
    ("name: t\ntype: mul\npath: d.jsonl\nmax-seq-length: 64\n", '{"inputs_pretokenized": "q", '
     '"choices_pretokenized": ["a", "' + "long " * 100 + '"], "label": 0}\n', "more than the 64-token context"),
])
def test_bad_tasks_get_clear_errors(chat_model_dir, tmp_path, capsys, yaml_text, data, message):
    yaml_file = write_task(tmp_path, yaml_text, "d.jsonl", data)
    assert main(["eval", str(yaml_file), "--model", str(chat_model_dir), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_data_paths_resolve_like_the_official_loader(tmp_path):
    yaml_file = tmp_path / "t.yaml"
    assert parse_task({"name": "t", "type": "mul", "path": "d"}, yaml_file).path == tmp_path / "d"
    assert parse_task({"name": "t", "type": "mul", "path": "d"}, yaml_file, Path("/data")).path == Path("/data/d")
    assert parse_task({"name": "t", "type": "mul", "path": "~/d"}, yaml_file).path == Path.home() / "d"


def test_unknown_task_name_lists_the_shipped_ones():
    with pytest.raises(TaskConfigError, match="not a shipped task.*capitals"):
        resolve_tasks(["no-such-task"])


def test_official_yaml_keys_are_accepted(tmp_path, capsys):
    """GLM-130B's own lambada.yaml, as published: beam search keys are reported and ignored."""
    (tmp_path / "lambada").mkdir()
    (tmp_path / "lambada" / "test.jsonl").write_text('{"inputs_pretokenized": "a b", "targets_pretokenized": " c"}\n')
    (tmp_path / "lambada.yaml").write_text('name: "LAMBADA"\ntype: "gen"\nmodule: "tasks.lambada.task.LAMBADA"\n'
                                           'path: "lambada"\nfile-pattern:\n  test: "**/test.jsonl"\n\n'
                                           'sampling_strategy: "BeamSearchStrategy"\nnum_beams: 16\n'
                                           "max_gen_length: 5\nuse_task_mask: true\n")
    config = load_task(tmp_path / "lambada.yaml")
    assert (config.type, config.max_gen_length, config.gmask) == ("gen", 5, True)
    assert list(config.groups()) == ["test"]
    assert "ignoring module, num_beams, sampling_strategy" in capsys.readouterr().err


# ----- shipped tasks -----

def test_shipped_tasks_parse_and_have_their_files():
    configs = resolve_tasks([])
    assert sorted(c.name for c in configs) == shipped_task_names()
    assert {c.type for c in configs} == {"mul", "gen", "lm"}
    for config in configs:
        assert set(config.groups()) == {"en", "zh"}


def test_shipped_task_builder(tmp_path):
    sft = [{"skill": "capital", "lang": "en", "history": [], "prompt": f"Capital of {c}?",
            "response": f"The capital of {c} is {k}."} for c, k in
           [("France", "Paris"), ("Peru", "Lima"), ("Chad", "N'Djamena"), ("Laos", "Vientiane"), ("Iraq", "Baghdad")]]
    sft += [{"skill": "translate", "lang": "zh", "history": [], "prompt": f"把 {e} 翻译成中文。",
             "response": f"{e} 的意思是“{z}”。"} for e, z in [("sea", "海"), ("book", "书"), ("river", "河"),
                                                               ("cat", "猫")]]
    (tmp_path / "data" / "sft").mkdir(parents=True)
    (tmp_path / "data" / "pretrain").mkdir()
    (tmp_path / "data" / "sft" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (tmp_path / "data" / "pretrain" / "heldout.jsonl").write_text(json.dumps(
        {"text": "Some words here. " * 80 + "She was very happy indeed.", "lang": "en",
         "source": "r-cran-janeaustenr"}) + "\n")
    counts = build_tasks(tmp_path / "data", tmp_path / "tasks")
    assert counts["capitals"] == {"en": 5, "zh": 0} and counts["translation"]["zh"] == 4
    for line in (tmp_path / "tasks" / "capitals" / "en.jsonl").read_text().splitlines():
        record = json.loads(line)
        country = record["inputs_pretokenized"][len("Capital of "):-1]
        right = record["choices_pretokenized"][record["label"]]
        assert right == next(r["response"] for r in sft if r["prompt"] == record["inputs_pretokenized"])
        assert all(c.startswith(f"The capital of {country} is ") for c in record["choices_pretokenized"])
        assert len(set(record["choices_pretokenized"])) == 4
    last = json.loads((tmp_path / "tasks" / "lastword" / "en.jsonl").read_text().splitlines()[0])
    assert last["targets_pretokenized"] in (" here", " indeed")
    assert load_task(tmp_path / "tasks" / "capitals.yaml").gmask


def test_demo_model_on_shipped_tasks(tmp_path, capsys):
    """The shipped demo model through the CLI: a table on stdout, JSON with every task's rows."""
    out = tmp_path / "r.json"
    assert main(["eval", "capitals", "arithmetic", "--limit", "3", "--json", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["task", "group", "metric", "value", "n"]
    rows = {(r["task"], r["group"], r["metric"]): r for r in json.loads(out.read_text())["results"]}
    assert rows[("capitals", "all", "accuracy")]["n"] == 6
    assert rows[("capitals", "en", "accuracy")]["value"] == 100.0  # it knows these capitals (100% by exact match)
    assert rows[("arithmetic", "all", "em")]["n"] == 6 and ("arithmetic", "zh", "f1") in rows
    # The same answers through chat() (greedy), scored here.
    import glmkit
    from glmkit.eval.task_config import SHIPPED_TASKS_DIR

    model, tokenizer = glmkit.load(progress=False)
    records = [json.loads(line) for line in (SHIPPED_TASKS_DIR / "arithmetic" / "en.jsonl").read_text().splitlines()]
    hits = [exact_match_score(model.chat(tokenizer, r["inputs_pretokenized"], do_sample=False)[0],
                              r["targets_pretokenized"]) for r in records[:3]]
    assert rows[("arithmetic", "en", "em")]["value"] == pytest.approx(100 * sum(hits) / 3)


def test_last_word_is_right_when_greedy_decoding_produces_it(model):
    """Targets set to the model's own greedy tokens (found here on full sequences) count; one changed token does not."""
    config = parse_task({"name": "t", "type": "lm", "path": "x.jsonl"}, Path("t.yaml"))
    run = Run(model, None, config, batch_size=2, max_length=model.config.max_sequence_length, progress=False)
    items = []
    for n in (3, 6, 9):
        context, target = list(range(30, 30 + n)), []
        for _ in range(3):  # grow the word one greedy token at a time
            with torch.no_grad():
                logits = model(torch.tensor([[*context, GMASK, SOP, *target]])).logits[0, -1]
            target.append(int(logits.argmax()))
        items += [LastWordItem(context, target), LastWordItem(context, [*target[:-1], (target[-1] + 1) % 200])]
    tally = last_word(run, items, "test")
    assert (tally["last_word_items"], tally["last_word_correct"]) == (6, 3)


def test_official_wikitext_yaml_with_data_path(chat_model_dir, tokenizer, tmp_path):
    """GLM-130B's wikitext-103.yaml as published, its data under --data-path, a `.tokens` file."""
    tasks, data = tmp_path / "tasks", tmp_path / "data" / "wikitext-103"
    tasks.mkdir()
    data.mkdir(parents=True)
    text = "The cat sat on the mat . \n The dog sat on the log . \n" * 30
    (data / "wiki.test.tokens").write_text(text, encoding="utf-8")
    (tasks / "wikitext-103.yaml").write_text('name: "WikiText-103"\ntype: "lm"\npath: "wikitext-103"\nfile-pattern:\n'
                                             '  test: "**/wiki.test.tokens"\n\ngeneration-length: 256\n'
                                             "use_task_mask: true\n")
    out = tmp_path / "r.json"
    assert main(["eval", str(tasks), "--data-path", str(tmp_path / "data"), "--model", str(chat_model_dir),
                 "--json", str(out), "--no-progress"]) == 0
    rows = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["ppl_token"]["n"] == len(tokenizer.encode(text, add_special_tokens=False))
    words, size = len(text.split()), len(text.encode())
    nll = math.log(rows["ppl_token"]["value"]) * rows["ppl_token"]["n"]
    assert rows["ppl_word"]["value"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert rows["bpb"]["value"] == pytest.approx(nll / math.log(2) / size, rel=1e-4)


def test_empty_data_file(chat_model_dir, tmp_path, capsys):
    yaml_file = write_task(tmp_path, "name: t\ntype: gen\npath: d.jsonl\n", "d.jsonl", "\n")
    assert main(["eval", str(yaml_file), "--model", str(chat_model_dir), "--no-progress"]) == 2
    assert "d.jsonl: no examples in the file" in capsys.readouterr().err
