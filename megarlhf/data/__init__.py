"""Data: tokenizers (sentencepiece, Hugging Face), datasets from jsonl/parquet with validation
and a resumable order, and the CPU demo's synthetic arithmetic task."""

from megarlhf.data.datasets import (
    DatasetError,
    FieldNames,
    LabelledResponse,
    PreferencePair,
    PromptExample,
    ResumableSampler,
    SFTExample,
    load_labelled_responses,
    load_preference_pairs,
    load_prompts,
    load_sft,
    split_steps,
    tokenize_prompt,
    tokenize_prompts,
    tokenize_response_steps,
)
from megarlhf.data.tokenizer import (
    ChatTemplate,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "ChatTemplate", "DatasetError", "FieldNames", "HFTokenizer", "LabelledResponse",
    "PreferencePair", "PromptExample", "ResumableSampler", "SFTExample", "SentencePieceTokenizer",
    "Tokenizer", "load_labelled_responses", "load_preference_pairs", "load_prompts", "load_sft",
    "load_tokenizer", "split_steps", "tokenize_prompt", "tokenize_prompts",
    "tokenize_response_steps", "train_sentencepiece",
]
