"""workflows.run and the tests find the ComfyUI the pack is installed in (a symlink in its
custom_nodes/, as scripts/run_comfyui.sh makes) before the default ~/comfy/ComfyUI."""

from __future__ import annotations

import comfyui_host


def fake_comfyui(root):
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "model_patcher.py").write_text("")
    (root / "nodes.py").write_text("")
    (root / "custom_nodes").mkdir()
    link = root / "custom_nodes" / "ComfyUI-MoLE-MoA"
    link.symlink_to(comfyui_host.REPO)
    return link


def test_found_through_the_folder_it_was_entered_by(tmp_path, monkeypatch):
    link = fake_comfyui(tmp_path / "ComfyUI")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfyui_host, "HOST_RECORD", tmp_path / "none")
    monkeypatch.setenv("PWD", str(link / "workflows"))  # `cd ComfyUI/custom_nodes/ComfyUI-MoLE-MoA/workflows`
    assert comfyui_host.find_host()[0] == (tmp_path / "ComfyUI").resolve()


def test_found_through_run_comfyuis_record(tmp_path, monkeypatch):
    fake_comfyui(tmp_path / "ComfyUI")
    record = tmp_path / "record"
    record.write_text(str(tmp_path / "ComfyUI") + "\n")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfyui_host, "HOST_RECORD", record)
    monkeypatch.setenv("PWD", str(comfyui_host.REPO))
    assert comfyui_host.find_host()[0] == (tmp_path / "ComfyUI").resolve()


def test_a_record_of_a_comfyui_without_the_pack_is_ignored(tmp_path, monkeypatch):
    other = tmp_path / "Other"
    fake_comfyui(other)
    (other / "custom_nodes" / "ComfyUI-MoLE-MoA").unlink()
    record = tmp_path / "record"
    record.write_text(str(other))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfyui_host, "HOST_RECORD", record)
    monkeypatch.setenv("PWD", str(comfyui_host.REPO))
    assert comfyui_host.find_host()[0] != other.resolve()
