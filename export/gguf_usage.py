"""How a GGUF bundle runs with llama.cpp's own tools: the commands for its README.md and manifest.

llama-mtmd-cli (no ``--jinja`` by default) formats prompts with a llama.cpp built-in template that
it detects from the GGUF's Jinja text, and puts its ``<__media__>`` marker right before the
question; llama-server renders the Jinja itself (its default) and puts each image where the
request's ``image_url`` part is. For a chat template with a built-in twin (``ChatTemplate.llama_cpp``,
the default for models trained here) both give the prompt the runtime builds, with default flags.
Other templates (``vicuna_v1``, the official MobileVLM checkpoints) need ``--jinja`` and the marker
and a newline at the start of the prompt.
"""
from __future__ import annotations

from edgevlm.runtime.chat import ChatTemplate

MARKER = "<__media__>"  # llama-mtmd-cli's default media marker (mtmd_default_marker)


def llama_cpp_usage(t: ChatTemplate, llm: str, mmproj: str) -> dict[str, str]:
    """{"cli", "server", "request"}: shell commands and the chat request body (JSON text) that
    answer as ``Runtime.load(bundle, backend="llamacpp")`` does (greedy: temperature 0)."""
    files = f"-m {llm} --mmproj {mmproj}"
    if t.llama_cpp:
        cli = f'llama-mtmd-cli {files} --image IMAGE.png -p "QUESTION" --temp 0'
        text = "QUESTION"
    else:
        sep = t.image_sep.replace("\n", "\\n")  # mtmd-cli turns \n in -p into a newline
        cli = f'llama-mtmd-cli {files} --jinja --image IMAGE.png -p "{MARKER}{sep}QUESTION" --temp 0'
        text = sep + "QUESTION"
    request = ('{"messages": [{"role": "user", "content": ['
               '{"type": "image_url", "image_url": {"url": "data:image/png;base64,BASE64_PNG"}}, '
               f'{{"type": "text", "text": "{text}"}}]}}], "temperature": 0}}')
    return {"cli": cli, "server": f"llama-server {files}", "request": request}


def readme(t: ChatTemplate, llm_files: dict[str, str], mmproj: str) -> str:
    """The bundle's README.md: the edgevlm command and llama.cpp's, for the first (default) quant."""
    llm = next(iter(llm_files.values()))
    u = llama_cpp_usage(t, llm, mmproj)
    how = ("llama.cpp's tools run it with their default flags (the chat template is llama.cpp's built-in "
           f"`{t.llama_cpp}` format, the image before the question, as the model was trained)."
           if t.llama_cpp else
           f"Its chat template (`{t.name}`) has no llama.cpp built-in twin: pass `--jinja` to "
           f"llama-mtmd-cli (llama-server uses it by default) and start the prompt with `{MARKER}` and "
           "the newline the model was trained with.")
    return f"""# GGUF bundle

LLM files: {', '.join(f'`{f}` ({q})' for q, f in llm_files.items())}; vision tower and projector: `{mmproj}`.
{how} `--temp 0` gives the greedy answers edgevlm gives.

edgevlm (torch-free runtime):

    edgevlm run --bundle . --backend llamacpp --image IMAGE.png --prompt "QUESTION"

llama.cpp's multimodal CLI:

    {u['cli']}

llama.cpp's server (OpenAI-compatible; put the image part before the text):

    {u['server']}
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' -d '{u['request']}'
"""
