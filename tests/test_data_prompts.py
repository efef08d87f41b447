"""Prompt sets: layouts, chat templates, length filtering, malformed rows, and the resumable prompt stream."""

import json
import logging
import os
import subprocess
import sys

import pytest

from megatron_sapo.data import DataConfig, PromptItem, PromptStream, load_prompts, load_tokenizer
from megatron_sapo.data.tokenizer import train_tiny_tokenizer
from megatron_sapo.errors import InputError

# The ChatML text of one user turn plus the assistant's opening, written out by hand.
CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # The same sentencepiece model as the tiny checkpoints' (same trainer, same seed), without building a model.
    folder = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    train_tiny_tokenizer(folder)
    return load_tokenizer(folder)


def write_jsonl(path, rows) -> str:
    """Rows are dicts (written as JSON) or raw strings (written as they are, for malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def test_string_prompts_are_rendered_with_chatml_and_keep_their_labels(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": "What is 3+4?", "label": "7"}, {"prompt": "Hi", "label": 19}]
    )
    prompts = load_prompts(DataConfig(train_files=[path]), tokenizer)

    first, second = prompts.items
    assert first.prompt_text == "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    assert first.prompt_ids == tokenizer.encode(CHATML_USER.format("What is 3+4?"))
    assert tokenizer.decode(first.prompt_ids) == first.prompt_text
    assert (first.label, second.label) == ("7", 19)
    assert (first.raw_prompt, first.index, second.index) == ("What is 3+4?", 0, 1)
    assert (first.source, second.source) == (f"{path}:1", f"{path}:2")
    assert (prompts.stats.num_rows, prompts.stats.num_prompts) == (2, 2)


def test_verl_parquet_layout(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "gsm8k.parquet")
    rows = [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "6"},
            "extra_info": {"split": "train", "index": 41},
        },
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": "What is 5-1?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "4"},
            "extra_info": {"split": "train", "index": 42},
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    items = load_prompts(DataConfig(train_files=[path]), tokenizer).items

    expected_text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2*3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert items[0].prompt_text == expected_text
    assert items[0].prompt_ids == tokenizer.encode(expected_text)
    assert [item.label for item in items] == ["6", "4"]
    assert items[1].data_source == "openai/gsm8k"
    assert items[1].extra_info == {"split": "train", "index": 42}
    assert items[1].raw_prompt == [{"role": "user", "content": "What is 5-1?"}]
    assert items[1].source == f"{path}:row 2"


def test_configurable_and_nested_keys(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "qa.jsonl", [{"question": "What is 1+1?", "answer": {"value": "2"}, "meta": {"k": 1}}]
    )
    config = DataConfig(train_files=[path], prompt_key="question", label_key="answer.value", metadata_key="meta")
    (item,) = load_prompts(config, tokenizer).items
    assert (item.raw_prompt, item.label, item.extra_info) == ("What is 1+1?", "2", {"k": 1})

    (unlabelled,) = load_prompts(DataConfig(train_files=[path], prompt_key="question", label_key=None), tokenizer).items
    assert unlabelled.label is None


def test_without_chat_template_the_string_is_tokenized_as_is(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "What is 3+4? Answer:", "label": "7"}])
    (item,) = load_prompts(DataConfig(train_files=[path], apply_chat_template=False), tokenizer).items
    assert item.prompt_text == "What is 3+4? Answer:"
    assert item.prompt_ids == tokenizer.encode("What is 3+4? Answer:")


def test_prompts_over_max_prompt_length_are_dropped_and_counted(tmp_path, tokenizer, caplog):
    short, long = "What is 3+4?", "What is 3+4? " * 20
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": p, "label": "7"} for p in (short, long, short, long, short)]
    )
    limit = len(tokenizer.encode(CHATML_USER.format(short)))  # a prompt of exactly the limit is kept

    with caplog.at_level(logging.WARNING, logger="megatron_sapo.data.prompts"):
        prompts = load_prompts(DataConfig(train_files=[path], max_prompt_length=limit), tokenizer)
    assert [item.raw_prompt for item in prompts.items] == [short] * 3
    assert [item.source for item in prompts.items] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert (prompts.stats.num_rows, prompts.stats.num_too_long, prompts.stats.num_prompts) == (5, 2, 3)
    assert f"dropped 2 of 5 prompts longer than data.max_prompt_length={limit} tokens" in caplog.text

    with pytest.raises(InputError, match=r"no prompts left of 5 rows \(0 malformed, 5 over data.max_prompt_length="):
        load_prompts(DataConfig(train_files=[path], max_prompt_length=limit - 1), tokenizer)


GOOD = {"prompt": "What is 3+4?", "label": "7"}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (
            json.dumps({"question": "What is 3+4?", "label": "7"}),
            "missing key 'prompt' — set data.prompt_key or fix the row",
        ),
        (json.dumps({"prompt": "What is 3+4?"}), "missing key 'label' — set data.label_key or fix the row"),
        (
            json.dumps({"prompt": "What is 3+4?", "label": None}),
            "missing key 'label' — set data.label_key or fix the row",
        ),
        ('{"prompt": "What is 3+4?", "label": "7"', "invalid JSON ("),
        ('["What is 3+4?", "7"]', "expected a JSON object, got list — fix the line"),
        (json.dumps({"prompt": "  ", "label": "7"}), "'prompt' is empty"),
        (json.dumps({"prompt": 12, "label": "7"}), "'prompt' must be a string or a non-empty list of {role, content}"),
        (json.dumps({"prompt": [{"role": "user"}], "label": "7"}), "'prompt'[0] must be a {role, content} message"),
        (json.dumps({"prompt": "Hi", "label": "7", "extra_info": [1]}), "'extra_info' must be an object, got list"),
    ],
)
def test_a_malformed_row_is_named_by_file_and_line(tmp_path, tokenizer, bad_line, message):
    # Line 2 is blank: line numbers are the file's, not the row count.
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(InputError) as error:
        load_prompts(DataConfig(train_files=[path]), tokenizer)
    assert str(error.value).startswith(f"{path}:3: {message}")
    assert "\n" not in str(error.value)


def test_chat_messages_need_the_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": [{"role": "user", "content": "Hi"}], "label": "1"}])
    with pytest.raises(
        InputError, match=rf"^{path}:1: 'prompt' is a list of chat messages but data.apply_chat_template"
    ):
        load_prompts(DataConfig(train_files=[path], apply_chat_template=False), tokenizer)


def test_skip_bad_rows_skips_and_reports_them(tmp_path, tokenizer, caplog):
    rows = [GOOD, {"label": "1"}, "not json", {"prompt": "What is 3+4? " * 20, "label": "7"}, GOOD]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    config = DataConfig(train_files=[path], skip_bad_rows=True, max_prompt_length=40)
    with caplog.at_level(logging.WARNING, logger="megatron_sapo.data.prompts"):
        prompts = load_prompts(config, tokenizer)
    assert [item.source for item in prompts.items] == [f"{path}:1", f"{path}:5"]
    stats = prompts.stats
    assert (stats.num_rows, stats.num_bad_rows, stats.num_too_long, stats.num_prompts) == (5, 2, 1, 2)
    assert (
        f"skipped 2 malformed rows of 5 (data.skip_bad_rows=true); first: {path}:2: missing key 'prompt'" in caplog.text
    )


def test_files_are_read_in_order_and_indexed_across_them(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "label": "1"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "label": "2"}, {"prompt": "c", "label": "3"}])
    items = load_prompts(DataConfig(train_files=[first, second]), tokenizer).items
    assert [(item.index, item.label, item.source) for item in items] == [
        (0, "1", f"{first}:1"),
        (1, "2", f"{second}:1"),
        (2, "3", f"{second}:2"),
    ]


def test_bad_file_settings(tmp_path, tokenizer):
    with pytest.raises(InputError, match=r"^data.train_files is empty"):
        load_prompts(DataConfig(), tokenizer)
    with pytest.raises(InputError, match=r"^data.val_files: no such file .*missing.jsonl"):
        load_prompts(DataConfig(val_files=str(tmp_path / "missing.jsonl")), tokenizer, split="val")
    csv = tmp_path / "train.csv"
    csv.write_text("prompt,label\n")
    with pytest.raises(InputError, match=r"is neither .jsonl nor .parquet"):
        load_prompts(DataConfig(train_files=[str(csv)]), tokenizer)
    fake = tmp_path / "train.parquet"
    fake.write_text("not parquet")
    with pytest.raises(InputError, match=r"not a readable Parquet file"):
        load_prompts(DataConfig(train_files=[str(fake)]), tokenizer)


def test_config_validation():
    assert DataConfig(train_files="one.jsonl").train_files == ["one.jsonl"]
    assert DataConfig(train_batch_size=4).prompts_per_generation_round == 4
    assert DataConfig(train_batch_size=4, gen_batch_size=12).prompts_per_generation_round == 12
    with pytest.raises(InputError, match=r"^data.max_prompt_length=0: must be a positive integer"):
        DataConfig(max_prompt_length=0)
    with pytest.raises(
        InputError, match=r"^data.overlong_buffer_len=2048: must be in \(0, data.max_response_length=1024\]"
    ):
        DataConfig(enable_overlong_buffer=True, overlong_buffer_len=2048, max_response_length=1024)
    # Disabled, the buffer settings are not checked (verl's defaults need not fit a short max_response_length).
    DataConfig(enable_overlong_buffer=False, overlong_buffer_len=4096, max_response_length=1024)


def write_hf_tokenizer(folder, chat_template):
    """A word-level HF tokenizer (tokenizer.json + tokenizer_config.json) with the given chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "What", "is", "3+4?", "<s>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>"])
    # Like Llama's, it prepends a BOS when asked to add special tokens; a chat template already holds its own.
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 8)])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "unk_token": "<unk>"}
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def test_hf_tokenizer_chat_template_comes_from_tokenizer_config(tmp_path):
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    tokenizer = load_tokenizer(write_hf_tokenizer(tmp_path / "hf", template))
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "What is 3+4?", "label": "7"}])

    (item,) = load_prompts(DataConfig(train_files=[path]), tokenizer).items
    assert item.prompt_text == "<|im_start|>user What is 3+4?<|im_end|> <|im_start|>assistant "
    # <|im_start|>=1 user=3 What=5 is=6 3+4?=7 <|im_end|>=2 <|im_start|>=1 assistant=4, and no BOS (<s>=8).
    assert item.prompt_ids == [1, 3, 5, 6, 7, 2, 1, 4]
    assert tokenizer.encode("What is") == [8, 5, 6]  # the BOS the loader must not add

    bare = load_tokenizer(write_hf_tokenizer(tmp_path / "bare", None))
    with pytest.raises(InputError, match=r"^data.apply_chat_template=true but the tokenizer has no chat template"):
        load_prompts(DataConfig(train_files=[path]), bare)
    (raw,) = load_prompts(DataConfig(train_files=[path], apply_chat_template=False), bare).items
    assert raw.prompt_ids == [5, 6, 7]


def make_items(n):
    return [
        PromptItem(index=i, prompt_ids=[i], label=str(i), raw_prompt=f"p{i}", prompt_text=f"p{i}") for i in range(n)
    ]


def drawn(batches):
    return [[item.index for item in batch] for batch in batches]


def test_every_epoch_is_a_seeded_permutation():
    stream = PromptStream(make_items(10), seed=3)
    orders = [stream.epoch_order(epoch) for epoch in range(3)]
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert orders[0] != orders[1] != orders[2]
    assert PromptStream(make_items(10), seed=3).epoch_order(1) == orders[1]
    assert PromptStream(make_items(10), seed=4).epoch_order(0) != orders[0]
    assert PromptStream(make_items(10), shuffle=False, seed=3).epoch_order(2) == list(range(10))


def test_the_order_does_not_depend_on_the_interpreter_hash_seed():
    code = "from megatron_sapo.data import PromptStream; print(PromptStream(list(range(20)), seed=7).epoch_order(2))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(PromptStream(list(range(20)), seed=7).epoch_order(2))


def test_batches_run_across_epoch_boundaries():
    stream = PromptStream(make_items(5), seed=0)
    first, second = stream.epoch_order(0), stream.epoch_order(1)
    assert drawn([stream.next_batch(3), stream.next_batch(3)]) == [first[:3], first[3:] + second[:1]]
    assert (stream.epoch, stream.position) == (1, 1)
    assert drawn([stream.next_batch(4)]) == [second[1:]]
    assert (stream.epoch, stream.position) == (2, 0)


def test_a_resumed_stream_draws_the_same_prompts_as_an_uninterrupted_one():
    uninterrupted = PromptStream(make_items(10), seed=5)
    expected = drawn(uninterrupted.next_batch(3) for _ in range(8))  # 24 draws: 2.4 epochs

    interrupted = PromptStream(make_items(10), seed=5)
    before = drawn(interrupted.next_batch(3) for _ in range(3))
    state = json.loads(json.dumps(interrupted.state_dict()))  # as stored in a checkpoint
    assert state == {"epoch": 0, "position": 9, "seed": 5, "shuffle": True, "num_prompts": 10}

    resumed = PromptStream(make_items(10), seed=5)
    resumed.load_state_dict(state)
    assert before + drawn(resumed.next_batch(3) for _ in range(5)) == expected


def test_resuming_with_different_data_is_refused():
    state = PromptStream(make_items(10), seed=5).state_dict()
    with pytest.raises(InputError, match=r"^resume: the checkpoint's prompt stream was .* resume with the same data"):
        PromptStream(make_items(9), seed=5).load_state_dict(state)
    with pytest.raises(InputError, match=r"^resume: "):
        PromptStream(make_items(10), seed=6).load_state_dict(state)
