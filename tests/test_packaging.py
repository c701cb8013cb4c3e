"""ComfyUI-Manager / registry conventions: install.py, requirements, pyproject."""
import subprocess
import sys
import tomllib

from conftest import REPO_ROOT


def run_install_script(tmp_path) -> subprocess.CompletedProcess:
    """Run install.py as ComfyUI-Manager does: from the pack inside <tmp_path>/ComfyUI/custom_nodes/."""
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / "ComfyUI-EasyAnimate").symlink_to(REPO_ROOT, target_is_directory=True)
    result = subprocess.run([sys.executable, str(custom_nodes / "ComfyUI-EasyAnimate" / "install.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_install_script_creates_the_model_folder_and_prints_downloads(tmp_path):
    result = run_install_script(tmp_path)
    models = tmp_path / "ComfyUI" / "models" / "EasyAnimate"
    assert models.is_dir()
    assert (f"hf download alibaba-pai/EasyAnimateV5-12b-zh-InP --local-dir "
            f"{models / 'EasyAnimateV5-12b-zh-InP'}") in result.stdout


def test_requirements_use_loose_lower_bounds_and_never_pin_torch():
    lines = [line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for line in lines:
        assert "==" not in line and "<" not in line, f"requirements.txt must not pin: {line}"
    assert any(line.startswith("diffusers") for line in lines) and any(line.startswith("transformers") for line in lines)


def test_pyproject_has_the_registry_fields():
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] and project["version"] and project["description"] and project["license"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert not any(dep.startswith("torch") for dep in project["dependencies"])
