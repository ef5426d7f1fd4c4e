"""ISMoE under the HF Trainer (gradient accumulation, resuming from a checkpoint) and a plain Accelerate loop."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from peft_ismoe import ISMoEConfig

BERT = BertConfig(
    vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, size: int = 16, seq: int = 10) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, BERT.vocab_size, (size, seq), generator=generator)
        self.labels = (self.ids[:, 0] > BERT.vocab_size // 2).long()  # learnable from the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _model():
    torch.manual_seed(0)
    base = BertForSequenceClassification(copy.deepcopy(BERT))
    return get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2, init_seed=0))


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _trainer(model, output_dir, max_steps: int) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_Examples())


def test_trainer_with_gradient_accumulation_and_resume(tmp_path):
    model = _model()
    backbone_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    initial = _trainable(model)
    result = _trainer(model, tmp_path / "full", max_steps=4).train()
    assert result.global_step == 4
    final = _trainable(model)
    assert any(not torch.equal(initial[n], final[n]) for n in initial)
    assert all(torch.equal(p, backbone_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "adapter_config.json").exists()

    resumed = _model()
    _trainer(resumed, tmp_path / "resumed", max_steps=4).train(resume_from_checkpoint=str(checkpoint))
    for name, value in _trainable(resumed).items():
        torch.testing.assert_close(value, final[name], rtol=1e-5, atol=1e-6)


def _eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss


def test_plain_accelerate_loop_trains_the_side_network():
    accelerator = Accelerator(cpu=True)
    model = _model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(_Examples(), batch_size=16, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    everything = next(iter(loader))
    before = _eval_loss(model, everything)
    model.train()
    for _ in range(30):
        for batch in loader:
            optimizer.zero_grad()
            accelerator.backward(model(**batch).loss)
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
            optimizer.step()
    assert _eval_loss(model, everything) < 0.9 * before
    gate = accelerator.unwrap_model(model).base_model.ismoe_layer.ismoe_side["default"]["backbone"].output_gate
    assert gate.abs().max() > 0
