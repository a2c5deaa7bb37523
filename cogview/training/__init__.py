"""Trainers: the VQ-VAE and the CogView transformer, single-process or under torchrun (DDP / FSDP2).

    from cogview.training import train_vqvae
    train_vqvae(output="runs/vq", data="shapes", steps=2000, batch_size=64)
    train_transformer(output="runs/cv", data="shapes", vqvae="runs/vq", steps=5000, batch_size=32)

See cogview.training.engine for the loop, cogview.training.state for checkpoints and resuming.
"""
from cogview.training.config import TrainConfig, TransformerTrainConfig, VQVAETrainConfig, make_config
from cogview.training.engine import Trainer, lr_multiplier
from cogview.training.transformer_trainer import TransformerLoss, TransformerTrainer, train_transformer
from cogview.training.vqvae_trainer import VQVAELoss, VQVAETrainer, train_vqvae

__all__ = ["TrainConfig", "VQVAETrainConfig", "TransformerTrainConfig", "make_config", "Trainer", "lr_multiplier",
           "VQVAETrainer", "VQVAELoss", "train_vqvae", "TransformerTrainer", "TransformerLoss", "train_transformer"]
