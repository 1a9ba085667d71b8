"""Tokenizers (megarlhf/data/tokenizer.py): offline sentencepiece training, the chat template,
save/load, and the sentencepiece -> Hugging Face export (id for id)."""

import json
import random
import string

import pytest

from megarlhf.data.demo_task import ArithmeticConfig, ArithmeticTask
from megarlhf.data.tokenizer import (
    ChatTemplate,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

MSGS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "12+7*3="},
    {"role": "assistant", "content": "33"},
    {"role": "user", "content": "and {x} \"quoted\" 5-2?"},
]


def corpus(n=300, seed=0):
    task = ArithmeticTask(ArithmeticConfig(max_value=20))
    probs = task.problems("train", n, seed)
    return [p.prompt + "\n" + p.solution for p in probs] + ["the quick brown fox jumps"] * 5


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    return train_sentencepiece(corpus(), tmp_path_factory.mktemp("spm") / "demo", 160)


@pytest.fixture(scope="module")
def hf_export(spm_tok, tmp_path_factory):
    d = spm_tok.export_hf(tmp_path_factory.mktemp("hf"))
    return load_tokenizer(d)


def random_texts(n, seed, alphabet, extras=("", "<|user|>", "<|assistant|>", "<s>", "</s>", "\n")):
    rng = random.Random(seed)
    out = ["12+7*3=\n7*3=21\n12+21=33\nanswer: 33", " lead", "trail ", "  two  spaces ",
           "x<|user|> y", "", "\n\n", "<s>", "a</s>b"]
    for _ in range(n):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        out.append(a + rng.choice(extras) + b)
    return out


ASCII = string.ascii_letters + string.digits + string.punctuation + " \n"


def test_training_is_deterministic(tmp_path):
    """If this fails, retraining the demo tokenizer gives other ids, so a checkpoint's model no
    longer matches a tokenizer rebuilt from the same seed and corpus."""
    a = train_sentencepiece(corpus(), tmp_path / "a", 160)
    b = train_sentencepiece(corpus(), tmp_path / "b", 160)

    def pieces(tok):  # the file itself also records its own path (model_prefix)
        return [(tok.sp.id_to_piece(i), tok.sp.get_score(i)) for i in range(tok.vocab_size)]

    assert pieces(a) == pieces(b)


def test_encode_decode_round_trip_and_vocabulary(spm_tok):
    """If this fails, demo texts do not survive encode/decode, or digits, operators, the step
    delimiter and role tags are not the single tokens the demo and the PRM rely on."""
    sp = spm_tok
    assert (sp.pad_id, sp.bos_id, sp.eos_id) == (3, 1, 2)
    assert sp.vocab_size <= 160
    for text in corpus(50, seed=1) + ["Hello, World! (x) [y] {z} 3/4 -5"]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert 0 not in ids, f"<unk> in {text!r}"
    ids = sp.encode("12+345=357\n")
    pieces = [sp.sp.id_to_piece(i) for i in ids]
    assert pieces == ["1", "2", "+", "3", "4", "5", "=", "3", "5", "7", "\n"]
    for sym in ("\n", "<|user|>", "<|assistant|>", "<|system|>"):
        assert len(sp.encode(sym)) == 1 and sp.token_to_id(sym) is not None
    assert sp.token_to_id("no-such-piece") is None
    # bos/eos on request; control-token strings in text become the control tokens (as in HF).
    assert sp.encode("1", add_bos=True, add_eos=True) == [1, sp.encode("1")[0], 2]
    assert sp.encode("a</s>b") == sp.encode("a") + [2] + sp.encode("b")
    assert sp.decode([1, *sp.encode("ab"), 2], skip_special_tokens=False) == "<s>ab</s>"
    assert sp.decode([1, *sp.encode("ab"), 2]) == "ab"


def test_vocab_too_small_is_refused(tmp_path):
    """If this fails, a too-small vocab_size dies inside sentencepiece with an opaque error."""
    with pytest.raises(ValueError, match="raise vocab_size"):
        train_sentencepiece(corpus(20), tmp_path / "x", 20)


def test_chat_template(spm_tok):
    """If this fails, prompts reach the policy in another format than documented (role tags,
    generation prompt, BOS), or a bad template/message is accepted."""
    sp = spm_tok
    text = sp.render_chat(MSGS)
    assert text == ("<|system|>be brief\n<|user|>12+7*3=\n<|assistant|>33\n"
                    "<|user|>and {x} \"quoted\" 5-2?\n<|assistant|>")
    assert sp.apply_chat_template(MSGS) == [sp.bos_id] + sp.encode(text)
    assert not sp.render_chat(MSGS, add_generation_prompt=False).endswith("<|assistant|>")
    plain = SentencePieceTokenizer(sp.model_file, ChatTemplate.plain())
    assert plain.apply_chat_template([{"role": "user", "content": "1+2="}]) == \
        [sp.bos_id] + sp.encode("1+2=")
    with pytest.raises(ValueError, match="role 'robot'"):
        sp.apply_chat_template([{"role": "robot", "content": "x"}])
    # an agent's tool message renders as a user message in the format-string template
    assert sp.render_chat([{"role": "tool", "content": "x"}]) == \
        sp.render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        ChatTemplate(user="no placeholder")
    assert ChatTemplate.from_dict(ChatTemplate().to_dict()) == ChatTemplate()


def test_save_and_load(spm_tok, tmp_path):
    """If this fails, a tokenizer saved with a checkpoint does not come back identical
    (model file or chat template lost)."""
    tmpl = ChatTemplate(user="Q: {content}\n", generation_prompt="A:")
    tok = SentencePieceTokenizer(spm_tok.model_file, tmpl)
    tok.save(tmp_path / "ckpt")
    back = load_tokenizer(tmp_path / "ckpt")
    assert isinstance(back, SentencePieceTokenizer)
    assert back.chat_template == tmpl
    assert back.apply_chat_template(MSGS) == tok.apply_chat_template(MSGS)
    assert isinstance(load_tokenizer(spm_tok.model_file), SentencePieceTokenizer)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_hf_export_round_trips_ids(spm_tok, hf_export):
    """If this fails, an exported HF checkpoint tokenizes differently from training (vLLM and
    transformers would see other ids than the policy was trained on)."""
    hf = hf_export
    assert isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == \
        (spm_tok.vocab_size, spm_tok.bos_id, spm_tok.eos_id, spm_tok.pad_id)
    for text in random_texts(300, 0, ASCII):
        ids = spm_tok.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == spm_tok.decode(ids), text
    # The chat template travels as Jinja and gives the same prompt ids.
    assert hf.has_chat_template
    assert hf.apply_chat_template(MSGS) == spm_tok.apply_chat_template(MSGS)
    assert hf.apply_chat_template(MSGS, add_generation_prompt=False) == \
        spm_tok.apply_chat_template(MSGS, add_generation_prompt=False)


@pytest.mark.parametrize("model_type,byte_fallback", [("unigram", False), ("bpe", True)])
def test_hf_export_other_model_types(tmp_path, model_type, byte_fallback):
    """If this fails, exporting a unigram or byte-fallback sentencepiece model changes ids
    (non-ASCII text included, which byte fallback turns into byte tokens)."""
    vocab = 420 if byte_fallback else 160
    sp = train_sentencepiece(corpus(), tmp_path / "m", vocab, model_type=model_type,
                             byte_fallback=byte_fallback)
    hf = load_tokenizer(sp.export_hf(tmp_path / "hf"))
    alphabet = ASCII + ("éß€中" if byte_fallback else "")
    for text in random_texts(150, 1, alphabet):
        ids = sp.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == sp.decode(ids), text


def test_exported_dir_loads_with_plain_transformers(hf_export):
    """If this fails, `AutoTokenizer.from_pretrained(export_dir)` (what vLLM and users call)
    does not load the exported tokenizer or loses its special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_export.path), local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == \
        ("<s>", "</s>", "<pad>", "<unk>")
    cfg = json.loads((hf_export.path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (hf_export.path / "tokenizer.model").is_file()


def test_hf_tokenizer_uses_its_own_chat_template(hf_export, tmp_path):
    """If this fails, an HF tokenizer's own chat template is ignored (or the fallback template
    is not used when it has none)."""
    hf = hf_export
    hf.tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                            "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    hf.save(tmp_path / "own")
    own = load_tokenizer(tmp_path / "own")
    msgs = [{"role": "user", "content": "1+2="}]
    assert own.render_chat(msgs) == "[user]1+2=[assistant]"
    assert own.apply_chat_template(msgs) == own.encode("[user]1+2=[assistant]")
    own.tok.chat_template = None
    assert own.render_chat(msgs) == "<s><|user|>1+2=\n<|assistant|>"
    assert own.apply_chat_template(msgs)[0] == own.bos_id


def test_export_refuses_inexact_models(tmp_path):
    """If this fails, a sentencepiece model whose HF export cannot be exact (dummy prefix)
    is exported silently and tokenizes differently after export."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(50)), model_prefix=str(tmp_path / "p"), vocab_size=60,
        add_dummy_prefix=True, num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    tok = SentencePieceTokenizer(tmp_path / "p.model")
    with pytest.raises(ValueError, match="add_dummy_prefix"):
        tok.export_hf(tmp_path / "hf")
