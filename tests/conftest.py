"""Test setup: offline, quiet, seeded; tiny models of several architectures built from configs."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="momos-hf-home-"))
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU through triton's interpreter
os.environ.setdefault(
    "MOMOS_HF_KERNEL_CACHE", tempfile.mkdtemp(prefix="momos-hf-kernels-")
)  # the C++ lookup builds here

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging

logging.disable_progress_bar()
logging.set_verbosity_error()


def tiny_llama() -> torch.nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def tiny_gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=96,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def tiny_bert() -> torch.nn.Module:
    return BertModel(
        BertConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )


def tiny_t5() -> torch.nn.Module:
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=96,
            d_model=32,
            d_ff=48,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )


# name -> (builder, leaf names of the default targets in each block)
ARCHITECTURES = {
    "llama": (tiny_llama, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "gpt2": (tiny_gpt2, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    "bert": (tiny_bert, {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"}),
    "t5": (tiny_t5, {"q", "k", "v", "o", "wi", "wo"}),
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch][0]().eval()


def model_inputs(arch: str, batch: int = 2, length: int = 12, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (batch, length), generator=generator)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids}


def main_output(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
