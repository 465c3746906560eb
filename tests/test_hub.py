"""Pushing to the Hub, offline: the upload calls are intercepted and what would be uploaded is checked."""

import os
import pickle
from concurrent.futures import Future

import pytest
from safetensors.torch import load_file

from alp_trl import ALPConfig
from alp_trl.perturbation import MODULE_NAME, SIDE_FILE

from .helpers import build_trainer


SECRET = "hf_ThisIsNotARealTokenButMustNeverLeak"


class FakeHubApi:
    """Records create_repo / upload_folder calls and a snapshot of every uploaded folder."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "token_given": token == SECRET})

        class Url(str):
            pass

        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(
        self, repo_id, folder_path, run_as_future=False, path_in_repo=None, ignore_patterns=None, **kwargs
    ):
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                relative = os.path.relpath(os.path.join(root, name), folder_path)
                if ignore_patterns and any(relative.startswith(p.rstrip("*")) for p in ignore_patterns if p != "_*"):
                    continue
                with open(os.path.join(root, name), "rb") as f:
                    files[relative] = f.read()
        self.uploads.append({"repo_id": repo_id, "path_in_repo": path_in_repo, "files": files})
        if run_as_future:
            future = Future()
            future.set_result(None)
            return future
        return None


@pytest.fixture
def fake_hub(monkeypatch):
    import transformers.trainer

    api = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    return api


@pytest.mark.parametrize("use_lora", [False, True])
def test_push_uploads_weights_without_sigma_side_file_and_card(
    fake_hub, make_model, tokenizer, prompt_dataset, train_args, use_lora, capsys, caplog
):
    from peft import LoraConfig

    args = ALPConfig(
        **{**train_args, "save_strategy": "steps", "save_steps": 2},
        push_to_hub=True,
        hub_model_id="someone/alp-test",
        hub_strategy="every_save",
        hub_private_repo=True,
        hub_token=SECRET,
        perturb_lr=0.05,
    )
    trainer = build_trainer(
        make_model(),
        tokenizer,
        prompt_dataset,
        args,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if use_lora else None,
        recipe_text="off_policy_correction: alp\nhub_token: <redacted>\n",
    )
    trainer.train()
    trainer.push_to_hub()

    assert fake_hub.repos == [{"repo_id": "someone/alp-test", "private": True, "token_given": True}]
    final = fake_hub.uploads[-1]["files"]
    weights_name = "adapter_model.safetensors" if use_lora else "model.safetensors"
    assert weights_name in final and SIDE_FILE in final and "alp_perturbation.json" in final
    weights = load_file(os.path.join(args.output_dir, weights_name))
    assert weights and not any(MODULE_NAME in key for key in weights)
    card = final["README.md"].decode()
    assert "## ALP settings" in card and "off_policy_correction: `alp`" in card and "sigma per layer" in card
    assert "## Recipe" in card
    # TRL's part of the card, from ALPGRPOTrainer's _tag_names and _name
    assert "- alp\n" in card and "ALP-GRPO" in card
    # the token is nowhere: not printed, not logged, not in any uploaded file (training_args.bin included)
    output = capsys.readouterr()
    assert SECRET not in output.out + output.err + caplog.text
    for upload in fake_hub.uploads:
        for name, content in upload["files"].items():
            assert SECRET.encode() not in content, name
    assert pickle.loads(pickle.dumps(args)).hub_token is None and args.hub_token == SECRET
