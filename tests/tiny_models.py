"""Tiny random configs of many architectures, with matching training data and example inputs.

Each architecture is built from its real transformers config and model class (hidden size 32, 2 layers), so
tests exercise the real module structure: encoders, decoders, encoder-decoders and a vision transformer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers as T
from datasets import Dataset

VOCAB = 128
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=64)
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class TinyArchitecture:
    config_class: type
    config_kwargs: dict
    model_class: type
    auto_class: str  # the AutoModelFor... class a user would load the saved folder with
    task: str  # "classification", "causal_lm", "seq2seq" or "image"
    extra: dict = field(default_factory=dict)

    def build(self, seed: int = 0):
        torch.manual_seed(seed)
        return self.model_class(self.config_class(**self.config_kwargs)).eval()


ARCHITECTURES: dict[str, TinyArchitecture] = {
    "bert": TinyArchitecture(T.BertConfig, _ENCODER, T.BertForSequenceClassification,
                             "AutoModelForSequenceClassification", "classification"),
    "roberta": TinyArchitecture(T.RobertaConfig, {**_ENCODER, "pad_token_id": 1}, T.RobertaForSequenceClassification,
                                "AutoModelForSequenceClassification", "classification"),
    "distilbert": TinyArchitecture(T.DistilBertConfig, dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                                            hidden_dim=64, max_position_embeddings=64),
                                   T.DistilBertForSequenceClassification, "AutoModelForSequenceClassification",
                                   "classification"),
    "albert": TinyArchitecture(T.AlbertConfig, {**_ENCODER, "embedding_size": 16}, T.AlbertForSequenceClassification,
                               "AutoModelForSequenceClassification", "classification"),
    "deberta-v2": TinyArchitecture(T.DebertaV2Config, {**_ENCODER, "relative_attention": True,
                                                       "pos_att_type": ["p2c", "c2p"]},
                                   T.DebertaV2ForSequenceClassification, "AutoModelForSequenceClassification",
                                   "classification"),
    "gpt2": TinyArchitecture(T.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                bos_token_id=1, eos_token_id=2),
                             T.GPT2LMHeadModel, "AutoModelForCausalLM", "causal_lm"),
    "gpt-neox": TinyArchitecture(T.GPTNeoXConfig, {**_ENCODER, "bos_token_id": 1, "eos_token_id": 2},
                                 T.GPTNeoXForCausalLM, "AutoModelForCausalLM", "causal_lm"),
    "llama": TinyArchitecture(T.LlamaConfig, _DECODER, T.LlamaForCausalLM, "AutoModelForCausalLM", "causal_lm"),
    "llama-tied": TinyArchitecture(T.LlamaConfig, {**_DECODER, "tie_word_embeddings": True}, T.LlamaForCausalLM,
                                   "AutoModelForCausalLM", "causal_lm"),
    "mistral": TinyArchitecture(T.MistralConfig, _DECODER, T.MistralForCausalLM, "AutoModelForCausalLM",
                                "causal_lm"),
    "qwen2": TinyArchitecture(T.Qwen2Config, _DECODER, T.Qwen2ForCausalLM, "AutoModelForCausalLM", "causal_lm"),
    "phi3": TinyArchitecture(T.Phi3Config, _DECODER, T.Phi3ForCausalLM, "AutoModelForCausalLM", "causal_lm"),
    "t5": TinyArchitecture(T.T5Config, dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
                           T.T5ForConditionalGeneration, "AutoModelForSeq2SeqLM", "seq2seq"),
    "bart": TinyArchitecture(T.BartConfig, dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                                encoder_attention_heads=2, decoder_attention_heads=2,
                                                encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                decoder_start_token_id=2, forced_eos_token_id=None),
                             T.BartForConditionalGeneration, "AutoModelForSeq2SeqLM", "seq2seq"),
    "vit": TinyArchitecture(T.ViTConfig, dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                              num_labels=3),
                            T.ViTForImageClassification, "AutoModelForImageClassification", "image"),
}


def training_dataset(task: str, n: int = 16, length: int = 12, seed: int = 0) -> Dataset:
    """Random examples in the shape each task's model takes (labels included)."""
    g = torch.Generator().manual_seed(seed)
    if task == "image":
        pixels = torch.randn(n, 3, 16, 16, generator=g)
        labels = torch.randint(0, 3, (n,), generator=g)
        return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()})
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    if task == "classification":
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] >= VOCAB // 2).long().tolist()})
    if task == "causal_lm":
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    if task == "seq2seq":
        targets = torch.randint(3, VOCAB, (n, 6), generator=g)
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": targets.tolist()})
    raise ValueError(task)


def example_inputs(task: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A small batch to compare outputs of the in-memory and the reloaded model."""
    g = torch.Generator().manual_seed(seed)
    if task == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    if task == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=g)}
    return {"input_ids": ids}


def torch_batches(task: str, n: int = 16, batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The training dataset as a list of tensor batches (what post-hoc methods read)."""
    data = training_dataset(task, n=n, seed=seed).with_format("torch")
    return [data[i:i + batch_size] for i in range(0, n, batch_size)]
