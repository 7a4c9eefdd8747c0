"""The recursive GPT (torch only): config, layers, recursion, losses, halting head, EMA, FLOPs."""

from model.config import PRESETS, GPTConfig
from model.ema import EMA
from model.gpt import ModelOutput, RecursiveGPT, StepCarry, StepOutput
from model.losses import improvement_reward, step_weights

__all__ = ["EMA", "PRESETS", "GPTConfig", "ModelOutput", "RecursiveGPT", "StepCarry", "StepOutput",
           "improvement_reward", "step_weights"]
