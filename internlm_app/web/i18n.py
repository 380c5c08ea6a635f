"""Every label of the web app in Chinese (the default) and English."""

from __future__ import annotations

import re

LANGUAGES = ("zh", "en")

# key -> (Chinese, English); values in {braces} are filled by t().
LABELS: dict[str, tuple[str, str]] = {
    "language_name": ("中文", "English"),
    "nav_chat": ("对话", "Chat"),
    "nav_status": ("状态", "Status"),
    "nav_history": ("历史", "History"),
    "settings_invalid": (
        "设置无效（请检查 INTERNLM_* 环境变量）：{error}",
        "Invalid settings (check INTERNLM_*): {error}",
    ),
    # loading
    "loading_start": ("准备中", "starting"),
    "loading_model": (
        "正在加载模型（下载 / 转换 / 载入）… {seconds} 秒 · {step}",
        "Loading the model… {seconds} s · {step}",
    ),
    "load_of": ("{done} / {total}", "{done} of {total}"),
    "load_step_download": (
        "从 ModelScope 下载模型：{size}，文件 {files}",
        "Downloading the model from ModelScope: {size}, file {files}",
    ),
    "load_step_convert": (
        "转换为 Llama 格式：分片 {done}/{total}",
        "Converting to the Llama layout: shard {done}/{total}",
    ),
    "load_step_load": ("把权重载入内存（{detail}）", "Loading the weights into memory ({detail})"),
    "load_step_warmup": ("预热生成线程", "Warming up the generation worker"),
    "load_step_batch": ("启动连续批处理", "Starting the continuous batch"),
    "load_step_connect": ("连接远程服务器 {detail}", "Connecting to the remote server {detail}"),
    "load_error_details": ("详细信息（英文）", "Details"),
    "load_error_no_gpu": (
        "模型加载失败：设置要求使用 GPU（INTERNLM_DEVICE=cuda），但看不到 CUDA GPU。请用 nvidia-smi 检查显卡，"
        "并确认安装的是 CUDA 版 torch。",
        "The model could not be loaded: the settings ask for a GPU (INTERNLM_DEVICE=cuda) but no CUDA GPU is visible. "
        "Check nvidia-smi and that torch is a CUDA build.",
    ),
    "load_error_out_of_memory": (
        "模型加载失败：内存或显存不足。请释放 GPU，或设置 INTERNLM_QUANTIZATION=8bit / 4bit。",
        "The model could not be loaded: not enough memory or GPU memory. Free the GPU, or set "
        "INTERNLM_QUANTIZATION=8bit or 4bit.",
    ),
    "load_error_needs_gpu": (
        "模型加载失败：8-bit / 4-bit 量化需要 CUDA GPU。在 CPU 上请取消 INTERNLM_QUANTIZATION。",
        "The model could not be loaded: 8-bit/4-bit quantization needs a CUDA GPU. Unset INTERNLM_QUANTIZATION on "
        "the CPU.",
    ),
    "load_error_missing_package": (
        "模型加载失败：缺少所需的 Python 包，详细信息中有安装命令。",
        "The model could not be loaded: a Python package it needs is not installed; the details give the command.",
    ),
    "load_error_damaged_files": (
        "模型加载失败：模型文件缺失、不完整或已损坏。请重新下载（python -m internlm_app download），"
        "或把 INTERNLM_MODEL_PATH 指向完好的副本。",
        "The model could not be loaded: a model file is missing, incomplete or damaged. Download it again (python -m "
        "internlm_app download) or point INTERNLM_MODEL_PATH at a good copy.",
    ),
    "load_error_not_a_model": (
        "模型加载失败：INTERNLM_MODEL_PATH 指向的不是模型目录（需要含 config.json 的文件夹）。请改正路径，"
        "或取消设置以自动下载。",
        "The model could not be loaded: INTERNLM_MODEL_PATH is not a model directory (the folder that holds "
        "config.json). Fix the path, or unset it to download the model.",
    ),
    "load_error_download_failed": (
        "模型下载失败：无法连接 ModelScope。请检查网络后重试，或在别处下载模型并设置 INTERNLM_MODEL_PATH。",
        "The model could not be downloaded: ModelScope could not be reached. Check the network and retry, or "
        "download the model elsewhere and set INTERNLM_MODEL_PATH.",
    ),
    "load_error_not_writable": (
        "模型加载失败：无法写入转换后的模型。"
        "请把 INTERNLM_CONVERTED_DIR（或 INTERNLM_CACHE_DIR）指向有空间、可写的目录。",
        "The model could not be loaded: the converted model cannot be written. Point INTERNLM_CONVERTED_DIR (or "
        "INTERNLM_CACHE_DIR) at a writable directory with free space.",
    ),
    "load_error_quantized_checkpoint": (
        "模型加载失败：这是量化模型（AWQ、GPTQ 等），无法转换。请使用原始 float16/bfloat16 模型，"
        "需要时用 INTERNLM_QUANTIZATION 量化。",
        "The model could not be loaded: it is a quantized checkpoint (AWQ, GPTQ, ...), which cannot be converted. "
        "Use the original float16/bfloat16 model; INTERNLM_QUANTIZATION quantizes it when it loads.",
    ),
    "load_error_warmup_failed": (
        "模型已载入，但第一次试运行失败。请查看详细信息；`python -m internlm_app doctor` 可检查 GPU 与模型文件。",
        "The model loaded, but its first trial reply failed. See the details; `python -m internlm_app doctor` checks "
        "the GPU and the model files.",
    ),
    "load_error_remote_misconfigured": (
        "INTERNLM_OPENAI_BASE_URL 指向的不是可用的 OpenAI 兼容模型服务器（是本服务自身，或不是这种 API）。"
        "请把它设为 LMDeploy 或 vLLM 服务器的地址，例如 http://127.0.0.1:23333/v1。",
        "INTERNLM_OPENAI_BASE_URL does not lead to an OpenAI-compatible model server (it is this server itself, or "
        "not that kind of API). Set it to the LMDeploy or vLLM server's address, e.g. http://127.0.0.1:23333/v1.",
    ),
    "load_error_unexpected": (
        "模型加载失败，原因未知。详细信息中有错误内容；如果看起来是程序错误，请附上它报告问题。",
        "The model could not be loaded for an unexpected reason. The details show the error; if it looks like a bug, "
        "please report it with them.",
    ),
    "load_failed_hint": (
        "修复后点击“重试”。`python -m internlm_app doctor`（或“状态”页）可检查 GPU、显存、模型文件与磁盘。",
        "Fix it, then press Retry. `python -m internlm_app doctor` (or the Status page) checks the GPU, memory, "
        "model files and disk.",
    ),
    "retry": ("重试", "Retry"),
    # chat page
    "chat_intro": (
        "向 InternLM2 提问吧。对话会自动保存，网址中的 ?c= 可用于稍后打开。",
        "Ask InternLM2 anything. Conversations are saved; the ?c= in the URL reopens this one.",
    ),
    "chat_placeholder": ("输入消息，回车发送", "Type a message and press Enter"),
    "chat_busy_here": ("这个对话正在生成回复…", "A reply to this conversation is being generated…"),
    "chat_queue_here": (
        "回复生成中，现在发送的消息会排队",  # (short: a phone shows one line of it)
        "A reply is being generated; a message sent now goes out when it ends",
    ),
    "logout": ("退出登录", "Log out"),
    # Status page: the model's facts, GPU memory and versions
    "field_name": ("模型名称", "model"),
    "field_path": ("路径", "path"),
    "field_dtype": ("数据类型", "dtype"),
    "field_device": ("设备", "device"),
    "field_device_map": ("设备分配", "device map"),
    "field_quantization": ("量化", "quantization"),
    "field_attn_implementation": ("注意力实现", "attention"),
    "field_context_window": ("上下文窗口", "context window"),
    "field_parameters": ("参数量", "parameters"),
    "field_load_seconds": ("加载耗时", "load time"),
    "field_served_by": ("服务方式", "served by"),
    "field_models_loaded_by_process": ("本进程加载的模型数", "models loaded by this process"),
    "served_one_process": ("网页 + API，同一进程", "web app + API, one process"),
    "served_web_only": ("仅网页", "web app only"),
    "mem_allocated": ("已分配", "allocated"),
    "mem_reserved": ("已预留", "reserved"),
    "mem_total": ("总量", "total"),
    "version_column": ("版本", "version"),
    "ram_available": ("可用内存", "RAM available"),
    "disk_free": ("磁盘剩余", "disk free"),
    "live_generating": ("正在生成…", "Generating…"),
    "queued_message": ("排队中：当前回复结束后发送", "Queued: sent when the current reply ends"),
    "queued_remove": ("移除", "Remove"),
    "edit_message_left_path": (
        "你正在编辑的消息已不在这个对话当前显示的路径上（在另一个标签页中被更改）。你的修改保留在下面，可作为新消息发送。",
        "The message you were editing is no longer on this conversation's path (it changed in another tab). Your "
        "text is kept below: send it as a new message, or discard it.",
    ),
    "edit_conversation_deleted": (
        "你正在编辑的对话已在另一个标签页中被删除。你的修改保留在下面，可在新对话中发送。",
        "The conversation you were editing was deleted in another tab. Your text is kept below, to send in a new "
        "conversation, or discard.",
    ),
    "draft_restored": (
        "登录已恢复：你在退出登录时输入的内容已放回原处，请检查后再发送。",
        "You are logged in again: what you had typed when the login was lost is back in its box. Check it, then send.",
    ),
    "queued_save": ("保存", "Save"),
    "queued_edit_waits": (
        "编辑期间，这条消息（以及排在它后面的消息）暂不发送。",
        "While you edit it, this message (and those queued after it) waits.",
    ),
    "queued_removed": ("已从队列中移除，不会发送。", "Removed from the queue: it will not be sent."),
    "queued_gone": (
        "这条消息已经发送（或在另一个标签页中被移除）。",
        "That message was sent already (or removed in another tab).",
    ),
    "queued_sent_while_edited": (
        "这条消息在你编辑时已经发送。你的修改已放入它的编辑框，可作为新版本发送。",
        "That message was sent while you edited it. Your text is in its edit box now: send it as a new version of it.",
    ),
    "queued_gone_while_edited": (
        "这条消息在你编辑时已被发送或移除。你的修改保留在下面，可作为新消息发送。",
        "That message was sent or removed while you edited it. Your text is kept below: send it as a new message, or "
        "discard it.",
    ),
    "set_aside_label": ("你的修改", "Your text"),
    "set_aside_send": ("作为新消息发送", "Send as a new message"),
    "set_aside_discard": ("丢弃", "Discard"),
    "conversation_not_found": (
        "找不到对话 {cid}（可能已被删除），已开始新对话。",
        "Conversation {cid} was not found (deleted?); starting a new one.",
    ),
    "queue_place": (
        ":material/hourglass_top: 模型正忙（正在为其他对话或 API 请求生成），你排在第 {place} 位…",
        ":material/hourglass_top: The model is busy with other replies (tabs or API clients); you are number {place} "
        "in line…",
    ),
    "generating": (
        ":material/hourglass_top: 正在生成（另一个标签页）…",
        ":material/hourglass_top: Being generated (in another tab)…",
    ),
    "interrupted": (
        ":material/warning: 生成被中断（服务重启？）",
        ":material/warning: Generation was interrupted (server restarted?)",
    ),
    "stop": ("停止生成", "Stop"),
    "stopped_mark": (":material/stop_circle: 已停止", ":material/stop_circle: Stopped"),
    "stopped_before_first_token": (
        ":material/stop_circle: 在第一个 token 之前停止",
        ":material/stop_circle: Stopped before the first token",
    ),
    "reply_error": (
        "回复出错：{error}（对话已保留，可重新生成。）",
        "The reply failed: {error} (the conversation is kept; you can regenerate.)",
    ),
    "unknown_error": ("未知错误", "unknown error"),
    "error_tool_call_cut_off": (
        "工具调用写到一半就到了“最大生成长度”。请在侧边栏调大它后重新生成",
        "the tool call was cut off by “Max new tokens”. Raise it in the sidebar and regenerate",
    ),
    "error_tool_call_no_room": (
        "工具调用写到一半，上下文就用完了。请开一个新对话、缩短系统提示或这条消息，或调大“上下文长度”",
        "the tool call was cut off: the context budget ran out. Start a new conversation, shorten the system prompt "
        "or this message, or raise “Max length”",
    ),
    "error_queue_full": (
        "模型正忙，排队的请求已满。请稍后重新生成",
        "the model is busy and its queue is full. Regenerate in a moment",
    ),
    "error_details": ("{reason}（详情：{details}）", "{reason} (details: {details})"),
    "error_context_too_long": (
        "对话放不进上下文预算。请缩短系统提示或这条消息、去掉附件、开一个新对话，或在侧边栏调大“上下文长度”",
        "the conversation does not fit the context budget. Shorten the system prompt or this message, remove "
        "attachments, start a new conversation, or raise “Max length” in the sidebar",
    ),
    "dropped_messages": (
        "上下文已满：最早的 {n} 条消息没有发送给模型。",
        "Context full: left out of the context, the oldest {n} messages.",
    ),
    "stat_tokens": ("{n} tokens", "{n} tokens"),
    "stat_ttft": ("首字 {s:.2f} 秒", "first token {s:.2f} s"),
    "stat_cached": ("复用缓存 {n} tokens", "{n} tokens from the KV cache"),
    "stat_speed": ("{v:.1f} tokens/秒", "{v:.1f} tokens/s"),
    "stat_finish": ("结束：{reason}", "ended: {reason}"),
    "finish_stop": ("完成", "done"),
    "finish_length": ("达到长度上限", "length limit"),
    "finish_cancelled": ("已停止", "stopped"),
    "finish_error": ("出错", "error"),
    "regenerate": ("重新生成", "Regenerate"),
    "edit": ("编辑", "Edit"),
    "edit_label": ("编辑这条消息", "Edit this message"),
    "edit_send": ("发送", "Send"),
    "edit_waits": (
        "正在生成回复：编辑的内容已保留，回复结束后即可发送。",
        "A reply is generating: your edit is kept; send it when the reply ends.",
    ),
    "changed_before_send": (
        "这个对话刚在另一个标签页中改变了，消息没有发送，已放回输入框。请看一下现在的内容再发送。",
        "This conversation just changed in another tab, so your message was not sent: it is back in the box. Look at "
        "the conversation as it is now, then send it.",
    ),
    "changed_elsewhere": (
        "这个对话刚在另一个标签页中改变了，没有重新生成。请看一下现在的内容再操作。",
        "This conversation just changed in another tab, so nothing was regenerated. Look at it as it is now, then act.",
    ),
    "edit_cancel": ("取消", "Cancel"),
    "edit_empty": ("消息不能为空", "The message is empty"),
    # conversation database faults ({path} and {fresh} are code spans, {detail} plain text)
    "store_read_only": (
        "对话数据库 {path} 是只读的，无法保存（{detail}）。已有对话仍可查看和导出。要继续保存，请让该文件及其所在目录"
        "可写，或把 INTERNLM_DB_PATH 指向可写的位置，然后重试。",
        "The conversation database {path} is read-only, so nothing can be saved ({detail}). Saved conversations can "
        "still be read and exported. To save again, make the file and its folder writable, or point "
        "INTERNLM_DB_PATH at a writable place, then try again.",
    ),
    "store_full": (
        "磁盘已满，对话数据库 {path} 无法写入（{detail}）。已有对话仍可查看和导出。请清理磁盘空间（`df -h` "
        "可查看剩余空间）后重试。",
        "The disk is full: the conversation database {path} cannot be written ({detail}). Saved conversations can "
        "still be read and exported. Free some disk space (`df -h` shows how much is left), then try again.",
    ),
    "store_corrupt": (
        "对话数据库 {path} 已损坏，无法读取（{detail}）。本应用不会改动这个文件。可以把它移走后刷新页面，"
        "或在它旁边新建一个数据库 {fresh}：旧对话仍留在损坏的文件里（可用 sqlite3 的 `.recover` 尝试找回）。",
        "The conversation database {path} is damaged and cannot be read ({detail}). The app leaves the file as it "
        "is. Move it away and reload the page, or start a fresh database beside it, {fresh}: the old conversations "
        "stay in the damaged file (sqlite3's `.recover` may rescue them).",
    ),
    "store_locked": (
        "对话数据库 {path} 被另一个程序长时间锁定（{detail}）。请稍后重试。",
        "The conversation database {path} is locked by another program ({detail}). Try again in a moment.",
    ),
    "store_newer": (
        "对话数据库 {path} 由更新版本的本应用写入（{detail}）。请升级本应用，或用 INTERNLM_DB_PATH 指定另一个文件。",
        "The conversation database {path} was written by a newer version of this app ({detail}). Upgrade the app, "
        "or point INTERNLM_DB_PATH at another file.",
    ),
    "store_unavailable": (
        "无法打开对话数据库 {path}（{detail}）。请检查该路径存在且可以访问（INTERNLM_DB_PATH），然后刷新页面。",
        "The conversation database {path} cannot be opened ({detail}). Check that the path exists and can be "
        "reached (INTERNLM_DB_PATH), then reload the page.",
    ),
    "store_start_fresh": ("在旁边新建数据库", "Start a fresh database beside it"),
    "store_fresh_in_use": (
        "正在使用新数据库 {path}（损坏的 {damaged} 未被改动）。重启后要继续使用它，请设置 INTERNLM_DB_PATH 为该路径。",
        "Using the fresh database {path} (the damaged {damaged} is untouched). To keep using it after a restart, "
        "set INTERNLM_DB_PATH to that path.",
    ),
    "store_kept": ("你输入的内容没有丢失，仍在输入框中。", "What you typed is not lost: it is back in the input box."),
    # sidebar
    "new_chat": ("新对话（清空）", "New chat (clear)"),
    "new_chat_help": (
        "清空当前窗口并开始新对话；原对话保留在“历史”中。",
        "Clears the screen and starts a new conversation; the old one stays in History.",
    ),
    "untitled": ("未命名对话", "Untitled"),
    "manage_chat": ("管理当前对话", "This conversation"),
    "rename_label": ("标题", "Title"),
    "rename": ("重命名", "Rename"),
    "delete": ("删除", "Delete"),
    "delete_confirm_text": ("确定删除这个对话吗？此操作无法撤销。", "Delete this conversation? This cannot be undone."),
    "delete_yes": ("确认删除", "Yes, delete"),
    "deleted": ("对话已删除", "Conversation deleted"),
    "cancel": ("取消", "Cancel"),
    "model_line": ("模型：{name} · {dtype} · {device}", "Model: {name} · {dtype} · {device}"),
    "model_remote": ("模型：{name}（远程 {url}）", "Model: {name} (remote {url})"),
    "gpu_line": (
        "{name}：已分配 {allocated} · 已保留 {reserved} · 总计 {total}",
        "{name}: allocated {allocated} · reserved {reserved} · total {total}",
    ),
    "gpu_none": ("CPU（未检测到 GPU）", "CPU (no GPU found)"),
    "queue_active": (
        "引擎：{active}/{slots} 个回复生成中，{waiting} 个请求等待中",
        "Engine: {active} of {slots} replies generating, {waiting} waiting",
    ),
    "status_decoding": ("解码方式", "Decoding"),
    "decode_single": ("单个回复的解码", "One reply alone"),
    "decode_batch": ("并发回复（连续批处理）", "Concurrent replies (continuous batching)"),
    "decode_reuse": ("跨轮复用的 KV 缓存", "KV cache kept across turns"),
    "decode_static": ("静态 KV 缓存 + torch.compile", "static KV cache + torch.compile"),
    "decode_dynamic": ("动态 KV 缓存", "dynamic KV cache"),
    "decode_batch_off": ("关闭（一次一个回复）", "off (one reply at a time)"),
    "decode_batch_on": (
        "最多 {slots} 个回复同时解码，分页 KV 缓存 {tokens} tokens",
        "up to {slots} replies at once, paged KV cache of {tokens} tokens",
    ),
    "decode_kept": ("{kept} / {budget} tokens", "{kept} / {budget} tokens"),
    "decode_why": ("原因", "Why"),
    # Why a decode path was chosen: backends/decode_plan.REASONS, with the same values.
    "why_cpu": ("在 CPU 上，编译的静态缓存只会更慢", "on the CPU a compiled static cache would only be slower"),
    "why_static_setting_off": ("INTERNLM_STATIC_CACHE=false", "INTERNLM_STATIC_CACHE=false"),
    "why_static_setting_on": ("INTERNLM_STATIC_CACHE=true", "INTERNLM_STATIC_CACHE=true"),
    "why_static_quantized": ("bitsandbytes 量化无法编译", "bitsandbytes quantization does not compile"),
    "why_static_fits": (
        "{window} tokens 上下文窗口的缓存（{need}）不超过权重之外空闲显存 {usable} 的四分之三",
        "the {window}-token window's cache ({need}) fits in three quarters of the {usable} free beside the weights",
    ),
    "why_static_too_big": (
        "{window} tokens 上下文窗口的静态缓存需要 {need}，超过权重之外空闲显存 {usable} 的四分之三",
        "a static cache for the {window}-token window needs {need}, more than three quarters of the {usable} free "
        "beside the weights",
    ),
    "why_static_too_big_shorter": (
        "{window} tokens 上下文窗口的静态缓存需要 {need}，超过权重之外空闲显存 {usable} 的四分之三；"
        "INTERNLM_MAX_LENGTH={fits} 可以放下",
        "a static cache for the {window}-token window needs {need}, more than three quarters of the {usable} free "
        "beside the weights; INTERNLM_MAX_LENGTH={fits} would fit",
    ),
    "why_static_warmup_failed": (
        "编译的静态缓存预热失败：{error}",
        "the compiled static cache failed its warm-up: {error}",
    ),
    "why_batch_setting_off": ("已关闭（INTERNLM_MAX_BATCH_SIZE=1）", "off (INTERNLM_MAX_BATCH_SIZE=1)"),
    "why_batch_eager": (
        "已关闭：批处理需要 sdpa 注意力（eager 时 transformers 会把模型切换为 paged|eager）",
        "off: the batch needs sdpa attention (with eager, transformers switches the model to paged|eager)",
    ),
    "why_batch_quantized": ("已关闭：未在 bitsandbytes 量化下验证", "off: not tried with bitsandbytes quantization"),
    "why_batch_split": ("已关闭：模型分布在多个设备上", "off: the model is split over several devices"),
    "why_batch_no_memory": ("已关闭：留给它的 KV 缓存只有 {left}", "off: only {left} left for its KV cache"),
    "why_batch_start_failed": (
        "已关闭：启动失败（{error}）；INTERNLM_MAX_BATCH_SIZE=1 可跳过它",
        "off: it failed to start ({error}); INTERNLM_MAX_BATCH_SIZE=1 skips it",
    ),
    "why_batch_on": (
        "最多 {slots} 个回复同时解码，分页 KV 缓存 {tokens} tokens（{size}）",
        "up to {slots} replies at once over a paged KV cache of {tokens} tokens ({size})",
    ),
    "queue_idle": ("引擎：空闲", "Engine: idle"),
    "clear_gpu": ("清理显存缓存", "Clear GPU cache"),
    "clear_gpu_cpu": ("CPU 运行：没有显存缓存可清理。", "Running on the CPU: there is no GPU cache to clear."),
    "clear_gpu_done": ("{name}：保留显存 {before} → {after}", "{name}: reserved {before} → {after}"),
    "sampling": ("生成参数", "Generation"),
    "param_temperature": ("温度 temperature", "Temperature"),
    "param_top_p": ("top_p", "Top p"),
    "param_top_k": ("top_k", "Top k"),
    "param_repetition_penalty": ("重复惩罚 repetition penalty", "Repetition penalty"),
    "param_max_new_tokens": ("最大生成长度 max new tokens", "Max new tokens"),
    "param_max_length": ("上下文长度 max length", "Max length (context budget)"),
    "help_temperature": ("0 为贪心解码；越大越随机。", "0 means greedy decoding; higher is more random."),
    "help_top_p": (
        "核采样：只保留累计概率达到该值的最小 token 集合。",
        "Nucleus sampling: keep the smallest token set with this probability mass.",
    ),
    "help_top_k": (
        "只保留概率最高的 k 个 token；0 表示不限制。",
        "Keep only the k most likely tokens; 0 disables the filter.",
    ),
    "help_repetition_penalty": (
        "对上下文中已出现的 token 降权；1 表示不惩罚。",
        "Penalty for tokens already in the context; 1 disables it.",
    ),
    "help_max_new_tokens": (
        "一次回复最多生成的 token 数（不超过上下文剩余空间）。",
        "Most tokens generated for one reply (capped by the room left in the context).",
    ),
    "help_max_length": (
        "提示词加回复的 token 预算；超出时最早的对话轮次不再发送。",
        "Token budget of prompt plus reply; beyond it the oldest turns are left out.",
    ),
    "system_prompt": ("系统提示词", "System prompt"),
    "system_prompt_reset": ("恢复默认", "Reset to default"),
    # status page
    "refresh": ("刷新", "Refresh"),
    "status_model": ("模型", "Model"),
    "status_field": ("项目", "Field"),
    "status_value": ("值", "Value"),
    "status_gpu": ("GPU 显存", "GPU memory"),
    "status_problems": ("诊断", "Checks"),
    "status_no_problems": ("没有发现问题", "No problems found"),
    "choose_conversation": ("选择一个对话", "Choose a conversation"),
    "import_file_help": (
        "本应用导出的 JSON 文件（“导出全部”或单个对话，最大 32 MB），或对话很多时导出的 ZIP（最大 200 MB）。",
        "A JSON file exported by this app (Export all, or one conversation; up to 32 MB), or the ZIP that Export all "
        "makes when there are many conversations (up to 200 MB).",
    ),
    "doctor_old_transformers": (
        "transformers {version} 太旧（需要 ≥ 5.3，CVE-2026-4372）：pip install -U transformers",
        "transformers {version} is too old (needs ≥ 5.3, CVE-2026-4372): pip install -U transformers",
    ),
    "doctor_no_gpu": (
        "看不到 CUDA GPU：7B 模型需要 NVIDIA GPU（float16 需 24 GB）。请用 nvidia-smi 检查，并确认 torch 是 CUDA 版。",
        "No CUDA GPU visible: the 7B model needs an NVIDIA GPU (24 GB for float16). Check nvidia-smi and that torch "
        "is a CUDA build.",
    ),
    "doctor_path_missing": (
        "模型路径 `{path}` 不存在：请检查 --model-path / INTERNLM_MODEL_PATH",
        "The model path `{path}` does not exist: check --model-path / INTERNLM_MODEL_PATH",
    ),
    "doctor_not_a_model": (
        "`{path}` 中没有 config.json，不是模型目录（--model-path / INTERNLM_MODEL_PATH）",
        "`{path}` has no config.json: not a model directory (--model-path / INTERNLM_MODEL_PATH)",
    ),
    "doctor_not_downloaded": (
        "模型尚未下载：运行 `python -m internlm_app download`（下载到 `{path}`）",
        "The model is not downloaded yet: run `python -m internlm_app download` (into `{path}`)",
    ),
    "doctor_low_disk": (
        "`{path}` 下只剩 {free}，下载并转换约需 {need}。"
        "在 AutoDL 上请把 INTERNLM_CACHE_DIR 指向 /root/autodl-tmp（数据盘）。",
        "Only {free} free under `{path}`; downloading and converting needs about {need}. On AutoDL point "
        "INTERNLM_CACHE_DIR at /root/autodl-tmp (the data disk).",
    ),
    "doctor_cache_not_dir": (
        "缓存目录 `{path}` 是一个文件：请移走它，或把 INTERNLM_CACHE_DIR 设为一个文件夹",
        "The cache directory `{path}` is a file: move it, or set INTERNLM_CACHE_DIR to a folder",
    ),
    "doctor_no_weights": (
        "`{path}` 有 config.json，但没有权重文件（*.safetensors / *.bin）：请重新下载",
        "`{path}` has a config.json but no weight files (*.safetensors / *.bin): download it again",
    ),
    "doctor_damaged_config": (
        "`{path}` 中的 config.json 或权重索引无法读取（下载不完整或已损坏）：请重新下载模型",
        "The config.json or weight index in `{path}` cannot be read (an incomplete or damaged download): download "
        "the model again",
    ),
    "doctor_damaged_model": (
        "`{path}` 中的模型文件不完整、已损坏或彼此不匹配：{detail}",
        "The model files in `{path}` are incomplete, damaged or do not match: {detail}",
    ),
    "doctor_needs_own_code": (
        "`{path}` 的模型类型 {model_type} 需要该文件夹自带的 Python 代码，本应用从不运行这类代码：请使用 transformers "
        "内置支持的模型，或 InternLM2 模型（会转换一次）",
        "`{path}` is of the model type {model_type}, which needs the folder's own Python code, which this app never "
        "runs: use a model transformers supports, or an InternLM2 model (converted once)",
    ),
    "doctor_damaged_conversion": (
        "转换后的副本 `{path}` 已损坏：删除该文件夹后重新启动，即可从下载的模型重新转换",
        "The converted copy `{path}` is damaged: delete that folder and start again to convert it anew from the "
        "download",
    ),
    "doctor_remote_misconfigured": (
        "`{url}` 不是可用的 OpenAI 兼容模型服务器（是本服务自身，或不是这种 API）：请检查 INTERNLM_OPENAI_BASE_URL"
        "（通常以 /v1 结尾，例如 http://127.0.0.1:23333/v1）",
        "`{url}` is not a usable OpenAI-compatible model server (it is this server itself, or not that kind of API): "
        "check INTERNLM_OPENAI_BASE_URL (it usually ends in /v1, e.g. http://127.0.0.1:23333/v1)",
    ),
    "doctor_remote_key_refused": (
        "`{url}` 的模型服务器拒绝了密钥：请检查 INTERNLM_OPENAI_API_KEY",
        "The model server at `{url}` refused the key: check INTERNLM_OPENAI_API_KEY",
    ),
    "doctor_remote_unreachable": (
        "连接不上 `{url}` 的模型服务器：请启动它，或检查 INTERNLM_OPENAI_BASE_URL",
        "Cannot reach the model server at `{url}`: start it, or check INTERNLM_OPENAI_BASE_URL",
    ),
    "doctor_remote_no_models": (
        "`{url}` 的模型服务器没有列出任何模型",
        "The model server at `{url}` lists no model",
    ),
    "status_versions": ("版本", "Versions"),
    # history page
    "search": ("搜索对话", "Search conversations"),
    "search_placeholder": ("标题或消息中的文字", "Text in a title or a message"),
    "conversations_found": ("对话（{n} 个）", "Conversations ({n})"),
    "message_count": ("{n} 条消息", "{n} messages"),
    "open": ("打开", "Open"),
    "export_all": ("导出全部", "Export all"),
    "export_all_json": ("全部导出为 JSON", "All as JSON"),
    "export_all_zip": ("全部导出为 JSON（ZIP，分多个文件）", "All as JSON (a ZIP of parts)"),
    "export_gone": (
        "（这个对话已被删除，可能是在另一个标签页中。）",
        "(This conversation was deleted, perhaps in another tab.)",
    ),
    "export_all_md": ("全部导出为 Markdown", "All as Markdown"),
    "import": ("导入", "Import"),
    "import_file": ("JSON 导出文件", "A JSON export file"),
    "imported": ("已导入 {n} 个对话", "Imported {n} conversations"),
    "import_error_too_large": (
        "导入失败，未做任何更改：文件太大（JSON 最大 32 MB，ZIP 最大 200 MB，解压后最大 1 GB）。",
        "Import failed, nothing was changed: the file is too large (JSON up to 32 MB, a ZIP up to 200 MB and 1 GB "
        "unpacked).",
    ),
    "import_error_not_json": (
        "导入失败，未做任何更改：这不是 JSON 文件。请选择本应用导出的 .json 文件。",
        "Import failed, nothing was changed: this is not a JSON file. Choose a .json file exported by this app.",
    ),
    "import_error_not_an_export": (
        "导入失败，未做任何更改：这个 JSON 不是本应用导出的对话。",
        "Import failed, nothing was changed: this JSON is not a conversation export of this app.",
    ),
    "import_error_unsupported_version": (
        "导入失败，未做任何更改：导出文件的版本不受支持，可能来自更新版本的应用。",
        "Import failed, nothing was changed: the export's version is not supported; it may come from a newer app.",
    ),
    "import_error_invalid": (
        "导入失败，未做任何更改：文件中有无效或超出限制的内容，详细信息中列出了位置。",
        "Import failed, nothing was changed: the file has invalid or oversized content; the details say where.",
    ),
    "import_no_file": (
        "请先选择一个导出文件（JSON 最大 32 MB，ZIP 最大 200 MB；超出的文件会被上传框标红拒绝）",
        "Choose an export file first (JSON up to 32 MB, ZIP up to 200 MB; the box marks a larger file in red and "
        "does not take it)",
    ),
    "import_skipped": ("；{n} 个已存在，已跳过", "; {n} already here, skipped"),
    "import_duplicates": ("已存在的对话", "Conversations already here"),
    "import_skip": ("跳过", "skip"),
    "import_keep_both": ("保留两份", "keep both"),
    # documents, tools and prompt presets in the chat (attachments_view, tools_view, presets)
    "attach_title": ("附件：发送前请确认", "Attached files: check before sending"),
    "attach_message": ("消息", "Message"),
    "attach_pages": ("PDF，{n} 页", "PDF, {n} pages"),
    "attach_lines": ("{n} 行", "{n} lines"),
    "attach_file_cost": ("{name}（{size}）：{n} tokens", "{name} ({size}): {n} tokens"),
    "attach_fits": (
        "放得下：附件共 {n} tokens，上下文预算还剩 {room} tokens。",
        "Fits: the files take {n} tokens; the context budget leaves {room}.",
    ),
    "attach_over": (
        "超出预算：附件共 {n} tokens，上下文预算只剩 {room} tokens。只会发送放得下的部分：",
        "Over budget: the files take {n} tokens, the context budget leaves {room}. Only what fits is sent:",
    ),
    "attach_strategy": ("发送哪一部分", "Which part to send"),
    "attach_strategy_leading": ("开头部分（前几页 / 前几行）", "The leading part (first pages or lines)"),
    "attach_strategy_best_matching": ("与消息最相关的部分", "The parts that best match the message"),
    "attach_part": ("{name}：发送 {parts}，{n} tokens", "{name}: sends {parts}, {n} tokens"),
    "attach_part_whole": ("{name}：全文发送，{n} tokens", "{name}: sent whole, {n} tokens"),
    "attach_nothing_fits": ("{name}：一点也放不下，不会发送", "{name}: nothing of it fits; it is not sent"),
    "attach_send": ("发送", "Send"),
    "attach_cancel": ("取消", "Cancel"),
    "attach_wait": ("正在生成回复，结束后才能发送。", "A reply is being generated; send once it has ended."),
    "attach_whole": ("全文", "whole"),
    # what part of a file was sent (the prompt's English header, attachments._block_of, in the page's language)
    "part_of_pages": ("（共 {n} 页）", " of {n} pages"),
    "part_pages": ("共 {n} 页", "{n} pages"),
    "part_of_lines": ("（共 {n} 行；其余放不下）", " of {n}; the rest did not fit"),
    "part_page": ("第 {n} 页", "page {n}"),
    "part_lines": ("第 {first}–{last} 行", "lines {first}-{last}"),
    "part_start": ("的开头", ", its start"),
    "part_sep": ("、", ", "),
    "attachment_label": ("{name} · {note} · {n} tokens", "{name} · {note} · {n} tokens"),
    "attach_error_unsupported_type": (
        "{name}：只能附加文本、Markdown、代码和 PDF 文件。",
        "{name}: only text, Markdown, code and PDF files can be attached.",
    ),
    "attach_error_not_text": (
        "{name}：不是 UTF-8、UTF-16、GB18030 或 Latin-1 编码的文本。",
        "{name}: this is not text in UTF-8, UTF-16, GB18030 or Latin-1.",
    ),
    "attach_error_pdf_encrypted": ("{name}：PDF 有密码保护，无法读取。", "{name}: the PDF is protected by a password."),
    "attach_error_pdf_unreadable": ("{name}：PDF 已损坏，无法读取。", "{name}: the PDF is damaged and cannot be read."),
    "attach_error_unreadable": (
        "{name}：读取此文件时出错（详见服务器日志），未附加。",
        "{name}: reading this file failed (the server log has the details); it is not attached.",
    ),
    "attach_error_too_large": (
        "{name}：文件太大（最多 20 MiB、200 万字）。",
        "{name}: too large (20 MiB, 2 M characters at most).",
    ),
    "attach_error_too_many_pages": ("{name}：PDF 页数太多（最多 500 页）。", "{name}: too many pages (500 at most)."),
    "attach_error_too_many_files": (
        "{name}：一条消息最多附加 20 个文件，这个没有附加。",
        "{name}: a message takes 20 files at most; this one was left out.",
    ),
    "attach_error_empty": ("{name}：文件里没有文字。", "{name}: the file holds no text."),
    "attach_error_pdf_no_text": (
        "{name}：没有文字（扫描的 PDF 只有图片，这里不做文字识别）。",
        "{name}: has no text (a scanned PDF holds images; there is no OCR here).",
    ),
    "tools": ("工具", "Tools"),
    "tools_on": ("让模型调用工具", "Let the model call tools"),
    "tools_help": (
        "开启后，模型可以调用时间、计算器、单位换算，以及 INTERNLM_TOOLS_DIR 中的工具；每次调用和结果显示在回复中。",
        "When on, the model may call the time, calculator and unit conversion tools and those in INTERNLM_TOOLS_DIR; "
        "each call and its result show in the reply.",
    ),
    "tool_choice": ("使用工具", "Use a tool"),
    "tool_choice_auto": ("由模型决定", "The model decides"),
    "tool_choice_help": (
        "选一个工具：回复的第一步一定调用它（由语法约束，参数一定有效）。",
        "Pick a tool: the reply's first step calls it (constrained by a grammar, so its arguments are valid).",
    ),
    "tools_need_local": (
        "工具需要本地模型；远程后端不支持。",
        "Tools need the local model; a remote backend has none.",
    ),
    "tools_user_dir": (
        "用户工具目录：{path}（其中的代码以本应用的权限运行）",
        "User tools from {path} (their code runs with the app's rights)",
    ),
    "tools_problem": ("未加载的工具：{where}：{message}", "A tool left out: {where}: {message}"),
    "tool_step": ("调用工具 {name}", "Called {name}"),
    "tool_step_failed": ("调用工具 {name}：出错", "Called {name}: it failed"),
    "tool_step_stopped": ("调用工具 {name}：已停止，未运行", "Call of {name}: stopped before it ran"),
    "tool_step_running": ("正在调用工具 {name}…", "Calling {name}…"),
    "tool_running": ("工具正在运行…", "The tool is running…"),
    "tool_arguments": ("参数", "Arguments"),
    "tool_result_took": ("结果（{s:.2f} 秒）", "Result ({s:.2f} s)"),
    "tool_not_run": ("工具没有运行。", "The tool did not run."),
    "preset": ("预设", "Preset"),
    "preset_none": ("（不用预设）", "(no preset)"),
    "preset_help": (
        "选择一个预设会把它的内容填入系统提示词。",
        "Picking a preset puts its text into the system prompt.",
    ),
    "preset_name": ("预设名称", "Preset name"),
    "preset_name_placeholder": ("给当前系统提示词起个名字", "A name for the system prompt above"),
    "preset_save": ("另存为预设", "Save as preset"),
    "preset_name_needed": ("请先填写预设名称。", "Give the preset a name first."),
    "preset_prompt_needed": ("系统提示词是空的。", "The system prompt is empty."),
    "preset_delete": ("删除预设", "Delete preset"),
    "preset_delete_confirm": ("删除预设“{name}”？", "Delete the preset “{name}”?"),
    # reply versions, branches, fork, feedback and copy (issue #16)
    "version_prev": ("上一个版本", "Previous version"),
    "version_next": ("下一个版本", "Next version"),
    "versions_busy": ("正在生成回复：结束后再切换版本", "A reply is being generated: switch versions when it ends"),
    "fork": ("分叉", "Fork"),
    "fork_help": (
        "把到这里为止的对话复制为一个新对话并打开",
        "Copy the conversation up to here into a new conversation and open it",
    ),
    "forked": ("已复制为新对话", "Forked into a new conversation"),
    "copy": ("复制", "Copy"),
    "copy_help": ("整条回复：用右上角的按钮复制", "The whole reply: copy it with the button at its top right"),
    "feedback_filter": ("反馈", "Feedback"),
    "feedback_any": ("全部", "any"),
    "feedback_up": ("👍 有帮助", "👍 thumbs up"),
    "feedback_down": ("👎 没帮助", "👎 thumbs down"),
}


_PLURAL_AFTER_N = re.compile(r"(\{n\} \w+?)s\b")


def t(key: str, lang: str, **values: object) -> str:
    """The label `key` in `lang` (Chinese for an unknown language), with `values` filled in. English nouns counted
    by `n` are written in the plural and made singular for n == 1 ("1 message", not "1 messages")."""
    zh, en = LABELS[key]
    text = en if lang == "en" else zh
    if lang == "en" and values.get("n") == 1:
        text = _PLURAL_AFTER_N.sub(r"\1", text)
    return text.format(**values) if values else text
