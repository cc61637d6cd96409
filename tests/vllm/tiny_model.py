"""A tiny random-weight Llama and a small BPE tokenizer, made at test time (no weights are
committed): 2 layers, hidden 256, 4 attention heads and 2 KV heads of head_dim 64 (what vLLM's
CPU attention supports), float32, saved with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "the cache keeps pages of keys and values for every layer of the model",
    "a tier stores each page under a key made of its tokens and its namespace",
    "when a request comes back the engine loads the pages instead of computing them",
    "storage is an accelerator and a failure becomes a miss never a crash",
    "two processes that serve the same model find each other's pages on the disk",
]


def make_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    """Write the model and tokenizer into ``path`` (created) and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path
