"""--prompts-file: which files are JSONL, what a line may hold, and errors that name the line (no model)."""

import json

import pytest

from lopa.errors import ConfigError
from lopa.prompts_file import configs, read_prompts


def test_a_json_named_file_is_read_as_jsonl_and_a_bom_is_not_part_of_a_prompt(tmp_path):
    for name in ("p.json", "p.jsonl", "p.ndjson", "P.JSONL"):
        path = tmp_path / name
        path.write_text(json.dumps({"prompt": "hi", "k": 2}) + "\n\n" + json.dumps({"prompt": [5, 6]}) + "\n")
        entries = read_prompts(path)
        assert [(e.line, e.prompt, e.fields) for e in entries] == [(1, "hi", {"k": 2}), (3, [5, 6], {})]
    plain = tmp_path / "p.txt"
    plain.write_bytes("\ufeffhello\r\n  \r\nworld\n".encode())
    assert [e.prompt for e in read_prompts(plain)] == ["hello", "world"]


def test_a_json_file_may_hold_one_array_of_objects(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a", "k": 1}, {"messages": [{"role": "user", "content": "b"}]}], indent=1))
    assert [(e.prompt, e.fields) for e in read_prompts(path)] == [("a", {"k": 1}),
                                                                  ([{"role": "user", "content": "b"}], {})]
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "tau": 7}]))
    with pytest.raises(ConfigError, match="item 2: tau"):
        configs(read_prompts(path), path, None, "dream", {})
    for bad in ("[]", "[1, 2]", "[{"):
        path.write_text(bad)
        with pytest.raises(ConfigError, match="prompts_file"):
            read_prompts(path)


def test_a_plain_file_of_json_objects_is_refused_not_read_as_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ConfigError, match="rename it to .jsonl"):
        read_prompts(path)


BAD_LINES = {
    "messages a string": ({"messages": "hello"}, "messages"),
    "messages of strings": ({"messages": ["hello"]}, "messages"),
    "prompt a number": ({"prompt": 5}, "prompt"),
    "prompt empty": ({"prompt": ""}, "empty"),
    "prompt of bools": ({"prompt": [True]}, "prompt"),
    "prompt of dicts": ({"prompt": [{"role": "user", "content": "x"}]}, "prompt"),
    "both": ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "one of them"),
    "trace": ({"prompt": "x", "trace": True}, "trace"),
    "unknown field": ({"prompt": "x", "kk": 1}, "kk"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_is_refused_naming_it(tmp_path, case):
    obj, words = BAD_LINES[case]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(ConfigError, match=f"line 2.*{words}"):
        read_prompts(path)


@pytest.mark.parametrize("value", [2.0, "nan", float("inf"), -1, True, "0.5"])
def test_a_bad_setting_on_a_line_names_the_line_and_the_field(tmp_path, value):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "tau": value}) + "\n")
    with pytest.raises(ConfigError, match="line 2: tau"):
        configs(read_prompts(path), path, None, "dream", {})
