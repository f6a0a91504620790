"""LLaVA-format data: loading, lookup, edited samples, digit images, and every bad-input message."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmerase.data import (DIGIT_WORDS, DataError, Sample, digit_images, digit_samples, get_sample, index_by_id,
                          load_dataset, modify_sample, save_dataset, write_digits_dataset)


def _png(path: Path, color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def _rec(i, image=None, q="<image>\nWhat is it?", a="red"):
    r = {"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture
def folder(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (0, 0, 255))
    return tmp_path


def test_load_json_list_resolves_images_and_allows_text_only(folder):
    records = [_rec(1, "img/a.png"), _rec(2, q="Say hi", a="hi"),
               {"id": 3, "image": "img/b.png", "conversations": [
                   {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nColour?"},
                   {"from": "gpt", "value": "blue"}, {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]}]
    (folder / "d.json").write_text(json.dumps(records))
    samples = load_dataset(folder / "d.json")
    assert [s.id for s in samples] == ["1", "2", "3"]
    assert samples[0].image_path == folder / "img" / "a.png"
    assert samples[0].load_image().getpixel((0, 0)) == (255, 0, 0)
    assert samples[1].image_path is None and not samples[1].has_image and samples[1].load_image() is None
    assert samples[2].query == "<image>\nColour?" and samples[2].response == "yes"
    assert samples[2].messages[0] == ("system", "Be brief.")


def test_load_jsonl_and_save_round_trip(folder):
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [_rec("x", "img/a.png"), _rec("y", q="hi")])
                                    + "\n\n")
    samples = load_dataset(folder / "d.jsonl")
    assert [s.id for s in samples] == ["x", "y"]
    out = save_dataset(samples, folder / "copy.json")
    assert json.loads(out.read_text())[0]["image"] == "img/a.png"
    again = load_dataset(out)
    assert [(s.id, s.conversations, s.image_path) for s in again] == [(s.id, s.conversations, s.image_path)
                                                                      for s in samples]


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", '{"id": "1", "conversations": []}\n{"id": 2,\n', "bad.jsonl: line 2: malformed JSON"),
    ("bad.json", '[{"id": "1",\n "conversations": ]', "bad.json: malformed JSON: Expecting value (line 2, column 19)"),
    ("bad.json", '{"id": "1"}', "bad.json: expected a JSON list of records"),
])
def test_malformed_json_names_file_and_line(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / name)
    assert expected in str(err.value)


@pytest.mark.parametrize("record, expected", [
    ({"id": "7"}, "record 0 (id '7'): missing field 'conversations'"),
    ({"id": "7", "conversations": [{"from": "human", "value": "hi"}]},
     "record 0 (id '7'): field 'conversations' has no assistant ('gpt') turn"),
    (_rec(7, q="<image>\nWhat?"), "record 0 (id '7'): field 'conversations' contains <image> but the record has no 'image'"),
    (_rec(7, "img/a.png", q="What?"), "record 0 (id '7'): field 'image' is set but no turn contains the <image> placeholder"),
    (_rec(7, "img/missing.png"), "record 0 (id '7'): field 'image': image file not found: "),
    ({"id": "7", "conversations": [{"from": "bot", "value": "x"}]},
     "record 0 (id '7'): field 'conversations[0].from' is 'bot'"),
    ({"id": "7", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "record 0 (id '7'): field 'conversations[0].value' must be a string"),
])
def test_invalid_records_name_file_record_and_field(folder, record, expected):
    (folder / "d.json").write_text(json.dumps([record]))
    with pytest.raises(DataError) as err:
        load_dataset(folder / "d.json")
    assert str(err.value).startswith(str(folder / "d.json") + ": ")
    assert expected in str(err.value)


def test_unreadable_image_includes_pillow_text(folder):
    (folder / "img" / "broken.png").write_bytes(b"not a png at all")
    (folder / "d.jsonl").write_text(json.dumps(_rec(1, "img/a.png")) + "\n" + json.dumps(_rec(2, "img/broken.png")))
    with pytest.raises(DataError) as err:
        load_dataset(folder / "d.jsonl")
    msg = str(err.value)
    assert "d.jsonl: line 2 (id '2'): field 'image': cannot read image" in msg
    assert "cannot identify image file" in msg  # Pillow's own words


def test_duplicate_ids(folder):
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [_rec(5, q="a"), _rec(6, q="b"), _rec(5, q="c")]))
    with pytest.raises(DataError, match=r"d\.jsonl: line 3: duplicate id '5' \(first used at line 1\)"):
        load_dataset(folder / "d.jsonl")


def test_lookup_by_id(folder):
    samples = [Sample("a", _rec(0, q="x")["conversations"]), Sample("b", _rec(0, q="y")["conversations"])]
    assert get_sample(samples, "b").query == "y"
    assert index_by_id(samples)["a"].query == "x"
    with pytest.raises(DataError, match=r"no sample with id '17' in the training data \(2 samples\)"):
        get_sample(samples, 17)


def test_modify_sample_query_image_response(folder):
    (folder / "d.json").write_text(json.dumps([_rec(1, "img/a.png")]))
    old = load_dataset(folder / "d.json")[0]
    new = modify_sample(old, image="img/b.png", root=folder)
    assert new.image_path == folder / "img" / "b.png" and new.conversations == old.conversations
    assert old.image_path == folder / "img" / "a.png"  # the original is untouched
    pil = Image.new("RGB", (16, 16), (0, 255, 0))
    new = modify_sample(old, image=pil, query="<image>\nWhat colour?")
    assert new.load_image().getpixel((3, 3)) == (0, 255, 0) and new.query == "<image>\nWhat colour?"
    same_text = modify_sample(old, image=pil)
    assert same_text != modify_sample(old, image=Image.new("RGB", (16, 16), (0, 0, 0)))  # images take part in ==
    assert same_text == modify_sample(old, image=pil.copy())
    assert modify_sample(old, response="crimson").response == "crimson"
    assert old.response == "red"
    with pytest.raises(DataError, match=r"edit of sample '1': field 'image' is set but no turn contains the <image> "
                                        r"placeholder"):
        modify_sample(old, query="What colour?")
    with pytest.raises(DataError, match=r"edit of sample '1': field 'image': image file not found: .*nope\.png"):
        modify_sample(old, image="nope.png", root=folder)
    with pytest.raises(DataError, match=r"edit of sample '1': field 'response': the sample has 1 assistant turn"):
        modify_sample(old, response="x", response_turn=3)


def test_digit_images_are_rgb_renderings_of_sklearn_digits():
    from sklearn.datasets import load_digits

    images, labels = digit_images(size=16, n=20)
    digits = load_digits()
    assert len(images) == 20 and labels == digits.target[:20].tolist()
    img = images[3]
    assert img.mode == "RGB" and img.size == (16, 16)
    arr = np.asarray(img)
    expected = np.round(digits.images[3] * 255 / 16).astype(np.uint8)
    assert np.array_equal(arr[::2, ::2, 0], expected) and np.array_equal(arr[1::2, 1::2, 2], expected)
    s = digit_samples([3], labels={3: 1})[0]
    assert s.response == "one" and s.query == "<image>\nWhat digit is this?" and s.id == "digit-3"
    assert digit_samples([3])[0].response == DIGIT_WORDS[labels[3]]


def test_write_digits_dataset_loads_back(tmp_path):
    path = write_digits_dataset(tmp_path, [0, 1, 2])
    samples = load_dataset(path)
    assert [s.response for s in samples] == ["zero", "one", "two"]
    assert np.array_equal(np.asarray(samples[1].load_image()), np.asarray(digit_images(16, 2)[0][1]))


# ---- the messages form and several images per sample ------------------------------------------------------------

def _msg(i, parts, answer="red", system=None):
    turns = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"id": str(i), "messages": turns}


def test_messages_records_and_image_lists_load_as_samples(folder):
    records = [_msg(1, [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": "What is it?"}],
                    system="Be brief."),
               _msg(2, [{"type": "text", "text": "Compare"}, {"type": "image", "image": "img/a.png"},
                        {"type": "image", "path": "img/b.png"}, {"type": "text", "text": "which is bluer?"}]),
               {"id": "3", "image": ["img/b.png", "img/a.png"], "conversations": [
                   {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}]},
               {"id": "4", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (folder / "d.json").write_text(json.dumps(records))
    s1, s2, s3, s4 = load_dataset(folder / "d.json")
    assert s1.messages == [("system", "Be brief."), ("user", "<image>\nWhat is it?"), ("assistant", "red")]
    assert s1.image_refs == [folder / "img" / "a.png"] and s1.image_count == 1
    assert s2.query == "Compare\n<image>\n<image>\nwhich is bluer?"
    assert s2.image_refs == [folder / "img" / "a.png", folder / "img" / "b.png"]
    assert [im.getpixel((0, 0)) for im in s2.load_images()] == [(255, 0, 0), (0, 0, 255)]
    assert s3.image_refs == [folder / "img" / "b.png", folder / "img" / "a.png"] and s3.image_count == 2
    assert s4.image_count == 0 and not s4.has_image and s4.response == "yo"
    again = load_dataset(save_dataset([s1, s2, s3, s4], folder / "copy.jsonl"))
    assert [(s.conversations, s.image_refs) for s in again] == [(s.conversations, s.image_refs)
                                                                for s in (s1, s2, s3, s4)]
    assert json.loads((folder / "copy.jsonl").read_text().splitlines()[1])["image"] == ["img/a.png", "img/b.png"]


@pytest.mark.parametrize("record, expected", [
    (_msg(7, [{"type": "video", "video": "v.mp4"}]),
     "record 0 (id '7'): field 'messages[0].content[0]': expected an object with 'type' 'text' or 'image'"),
    (_msg(7, [{"type": "image"}]), "field 'messages[0].content[0]': an image part needs 'image': a file path"),
    (_msg(7, [{"type": "text", "text": "<image> what?"}]),
     "field 'messages[0].content[0]'.text contains <image>; give each image as an image part"),
    (_msg(7, [{"type": "image", "image": "img/missing.png"}]),
     "field 'messages[0].content[0]': image file not found: "),
    ({"id": "7", "messages": [{"role": "bot", "content": "x"}]}, "field 'messages[0].role' is 'bot'"),
    ({"id": "7", "messages": [{"role": "user"}]}, "field 'messages[0]' must be an object with 'role' and 'content'"),
    ({**_msg(7, "hi"), "image": "img/a.png"}, "a 'messages' record gives its images as image parts"),
    (_rec(7, ["img/a.png", "img/b.png"]),
     "field 'conversations' contains 1 <image> placeholder(s) for 2 image(s); give one placeholder per image"),
    (_rec(7, ["img/a.png", "img/missing.png"], q="<image><image>"), "field 'image'[1]: image file not found: "),
    (_rec(7, []), "field 'image' must be a file path (string) or a list of them"),
])
def test_invalid_messages_and_image_lists_name_the_field(folder, record, expected):
    (folder / "d.json").write_text(json.dumps([record]))
    with pytest.raises(DataError) as err:
        load_dataset(folder / "d.json")
    assert str(err.value).startswith(str(folder / "d.json") + ": ") and expected in str(err.value)


def test_modify_sample_replaces_the_images_of_a_multi_image_sample(folder):
    (folder / "d.json").write_text(json.dumps([_rec(1, ["img/a.png", "img/b.png"], q="<image><image>Same?")]))
    old = load_dataset(folder / "d.json")[0]
    pil = Image.new("RGB", (20, 30), (0, 255, 0))
    new = modify_sample(old, image=[pil, "img/a.png"], root=folder)
    assert new.image_count == 2 and new.load_images()[0].size == (20, 30) and new.image_refs[1] == folder / "img/a.png"
    assert old.image_refs == [folder / "img" / "a.png", folder / "img" / "b.png"]
    with pytest.raises(DataError, match=r"edit of sample '1': field 'image': the sample has 2 images; give a list of "
                                        r"2 new images"):
        modify_sample(old, image=pil)
    with pytest.raises(DataError, match=r"contains 2 <image> placeholder\(s\) for 1 image\(s\)"):
        modify_sample(old, image=[pil])


def test_json_lines_with_raw_unicode_line_separators_load_whole(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw inside strings (files written with ensure_ascii=False have them);
    data and edits files split on newlines only, so such a record stays one record."""
    import json

    from mmerase.data import load_dataset
    from mmerase.editfile import parse_edits

    odd = "a\u2028b\u2029c\u0085d"
    rows = [{"id": "x1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": odd}]},
            {"id": "x2", "conversations": [{"from": "human", "value": "r"}, {"from": "gpt", "value": "s"}]}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    train = load_dataset(data)
    assert [s.id for s in train] == ["x1", "x2"] and train[0].response == odd
    edits = tmp_path / "e.jsonl"
    edits.write_text(json.dumps({"op": "correct", "id": "x2", "response": odd}, ensure_ascii=False) + "\n"
                     + json.dumps({"op": "remove", "id": "x1"}) + "\n", encoding="utf-8")
    requests = parse_edits(edits, train)
    assert len(requests) == 2 and requests[0].edit.new.response == odd
