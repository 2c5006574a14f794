"""Stand-in for the web UI's `launch` module (v1.10.1 `modules/launch_utils.py`), as extensions' install.py see it.

Same names, signatures and behaviour where install.py can tell: `is_installed`
looks up a distribution, then an importable module; `run_pip` runs
`python -m pip {command} --prefer-binary` through the shell, prints "Installing
{desc}", captures the output unless `live`, and raises RuntimeError with the
command and pip's output when pip fails. The index comes from INDEX_URL, as
in the web UI.
"""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

python = sys.executable
index_url = os.environ.get("INDEX_URL", "")
default_command_live = os.environ.get("WEBUI_LAUNCH_LIVE_OUTPUT") == "1"


def run(command, desc=None, errdesc=None, custom_env=None, live: bool = default_command_live) -> str:
    if desc is not None:
        print(desc)
    run_kwargs = {"args": command, "shell": True, "env": os.environ if custom_env is None else custom_env,
                  "encoding": "utf8", "errors": "ignore"}
    if not live:
        run_kwargs["stdout"] = run_kwargs["stderr"] = subprocess.PIPE
    result = subprocess.run(**run_kwargs)
    if result.returncode != 0:
        error_bits = [f"{errdesc or 'Error running command'}.", f"Command: {command}", f"Error code: {result.returncode}"]
        if result.stdout:
            error_bits.append(f"stdout: {result.stdout}")
        if result.stderr:
            error_bits.append(f"stderr: {result.stderr}")
        raise RuntimeError("\n".join(error_bits))
    return result.stdout or ""


def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=default_command_live):
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    return run(f'"{python}" -m pip {command} --prefer-binary{index_url_line}', desc=f"Installing {desc}",
               errdesc=f"Couldn't install {desc}", live=live)
