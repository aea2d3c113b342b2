"""data.teacher_share: teacher-generated text, stored once as token ids, resumable, mixed into the packed stream."""

from __future__ import annotations

import json

import pytest
import torch

from distill_helpers import char_tokenizer, tiny_recipe, tiny_student, tiny_teacher, write_corpus
from radistill.distill.data import PackedStream
from radistill.distill.recipe import merge
from radistill.distill.teacher_text import TeacherTextError, TeacherTexts, generate_texts


def _setup(tmp_path, documents=6, **data):
    corpus = tmp_path / "c.txt"
    write_corpus(corpus, docs=40)
    settings = {"teacher_share": 0.5, "teacher_documents": documents, "teacher_prompt_tokens": 8,
                "teacher_new_tokens": 12, "teacher_batch_size": 4, "teacher_dir": str(tmp_path / "texts"), **data}
    recipe = merge(tiny_recipe(corpus), {"data": settings})
    return recipe, tiny_teacher(), char_tokenizer()


def test_generated_once_resumable_and_reused(tmp_path):
    recipe, teacher, tok = _setup(tmp_path)
    root = tmp_path / "texts"
    assert generate_texts(teacher, tok, recipe.data, root, seed=0) == 6
    whole = [t.tolist() for t in TeacherTexts(root, recipe.data).texts]
    assert len(whole) == 6 and all(8 <= len(t) <= 20 for t in whole)
    prompts = [tok(d, add_special_tokens=False)["input_ids"][:8] for d in
               __import__("radistill.distill.data", fromlist=["x"])._training_documents(recipe.data)]
    assert all(t[:8] in prompts for t in whole)  # each text continues a training document's opening
    assert generate_texts(teacher, tok, recipe.data, root, seed=0) == 0  # reused, not generated again
    # interrupted after the first shard: resuming ends with the same texts
    index = json.loads((root / "index.json").read_text())
    index["shards"], index["documents"] = index["shards"][:1], index["shards"][0]["documents"]
    (root / "index.json").write_text(json.dumps(index))
    (root / "shard-000001.safetensors").unlink()
    with pytest.raises(TeacherTextError, match="interrupted"):
        TeacherTexts(root, recipe.data)
    assert generate_texts(teacher, tok, recipe.data, root, seed=0) == 2
    assert [t.tolist() for t in TeacherTexts(root, recipe.data).texts] == whole
    # a run of a smaller budget asks for fewer texts: the finished larger set serves it (its first texts); a run
    # that asks for more than were made is refused, as any other change of settings
    fewer = merge(recipe, {"data": {"teacher_documents": 4}}).data
    assert generate_texts(teacher, tok, fewer, root, seed=0) == 0
    assert [t.tolist() for t in TeacherTexts(root, fewer).texts] == whole[:4]
    more = merge(recipe, {"data": {"teacher_documents": 8}}).data
    with pytest.raises(TeacherTextError, match="other settings"):
        generate_texts(teacher, tok, more, root, seed=0)
    with pytest.raises(TeacherTextError, match="other data settings"):
        TeacherTexts(root, more)
    # other settings or a damaged shard are refused
    other = merge(recipe, {"data": {"teacher_temperature": 0.5}}).data
    with pytest.raises(TeacherTextError, match="other settings"):
        generate_texts(teacher, tok, other, root, seed=0)
    (root / "shard-000000.safetensors").write_bytes(b"x")
    with pytest.raises(TeacherTextError, match="altered"):
        TeacherTexts(root, recipe.data)


def test_stream_mixes_the_share_and_resumes_exactly(tmp_path):
    recipe, teacher, tok = _setup(tmp_path, documents=8)
    generate_texts(teacher, tok, recipe.data, tmp_path / "texts", seed=0)
    texts = {tuple(t.tolist()) for t in TeacherTexts(tmp_path / "texts", recipe.data).texts}
    stream = PackedStream(recipe.data, tok, 16, seed=3)
    first = stream.next_batch(20)
    state = json.loads(json.dumps(stream.state_dict()))
    rest = stream.next_batch(20)
    again = PackedStream(recipe.data, tok, 16, seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(20), rest)
    # sequences from the teacher's texts: their tokens appear in a text (the texts are framed and packed)
    joined = [t for text in texts for t in text]
    eos = tok.eos_token_id

    def from_texts(row):
        parts = [p for p in _split(row.tolist(), eos) if len(p) >= 4]
        return parts and all(any(_contains(list(t), p) for t in texts) for p in parts)

    share = sum(bool(from_texts(r)) for r in torch.cat([first, rest])) / 40
    assert 0.3 <= share <= 0.7 and joined


def _split(row, eos):
    out, cur = [], []
    for t in row:
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + [cur]


def _contains(seq, part):
    n = len(part)
    return any(seq[i : i + n] == part for i in range(len(seq) - n + 1))


def test_trainer_generates_into_the_run_and_trains(tmp_path):
    from radistill.distill.trainer import Trainer

    recipe, teacher, tok = _setup(tmp_path, documents=4)
    recipe = merge(recipe, {"data": {"teacher_dir": None}, "stages": {
        s: {"enabled": s == 3, "tokens": 16 * 4 * 2} for s in (1, 2, 3)}})
    Trainer(tiny_student(teacher), teacher, tok, recipe, tmp_path / "run", "cpu").run()
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["data"]["teacher_dir"] == str((tmp_path / "run" / "teacher_text").resolve())
    assert len(TeacherTexts(tmp_path / "run" / "teacher_text", recipe.data)) == 4


def test_data_flag_takes_a_teacher_share():
    from radistill.distill.cli import split_data_flags
    from radistill.utils.errors import RadistillError

    assert split_data_flags(["prose.txt", "teacher:0.25"]) == ("prose.txt", 0.25)
    assert split_data_flags(None) == (None, None)
    with pytest.raises(RadistillError, match="teacher:0.25"):
        split_data_flags(["teacher:lots"])
    with pytest.raises(RadistillError, match="one file"):
        split_data_flags(["a.txt", "b.txt"])
