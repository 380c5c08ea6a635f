"""Every label of the web app in Chinese (the default) and English."""

from __future__ import annotations

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
    "load_failed": ("模型加载失败：{error}", "The model could not be loaded: {error}"),
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
        "正在生成回复；现在发送的消息会在它结束后发出",
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
    "conversation_not_found": (
        "找不到对话 {cid}（可能已被删除），已开始新对话。",
        "Conversation {cid} was not found (deleted?); starting a new one.",
    ),
    "queue_place": (
        ":material/hourglass_top: 模型正忙（其他标签页正在生成），你排在第 {place} 位…",
        ":material/hourglass_top: The model is busy with another tab; you are number {place} in line…",
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
    "dropped_messages": (
        "上下文已满：最早的 {n} 条消息没有发送给模型。",
        "Context full: the oldest {n} messages were left out of the context.",
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
    "edit_label": ("编辑最后一条消息", "Edit the last message"),
    "edit_send": ("发送", "Send"),
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
    "status_backend": ("远程后端", "Remote backend"),
    "status_field": ("项目", "Field"),
    "status_value": ("值", "Value"),
    "status_gpu": ("GPU 显存", "GPU memory"),
    "status_problems": ("诊断", "Checks"),
    "status_no_problems": ("没有发现问题", "No problems found"),
    "status_versions": ("版本", "Versions"),
    # history page
    "search": ("搜索对话", "Search conversations"),
    "search_placeholder": ("标题或消息中的文字", "Text in a title or a message"),
    "conversations_found": ("对话（{n} 个）", "Conversations ({n})"),
    "message_count": ("{n} 条消息", "{n} messages"),
    "open": ("打开", "Open"),
    "export_all": ("导出全部", "Export all"),
    "export_all_json": ("全部导出为 JSON", "All as JSON"),
    "export_all_md": ("全部导出为 Markdown", "All as Markdown"),
    "import": ("导入", "Import"),
    "import_file": ("JSON 导出文件", "A JSON export file"),
    "imported": ("已导入 {n} 个对话", "Imported {n} conversations"),
    "import_failed": ("导入失败，未做任何更改：{error}", "Import failed, nothing was changed: {error}"),
    "import_no_file": ("请先选择一个 JSON 导出文件", "Choose a JSON export file first"),
    "import_skipped": ("；{n} 个已存在，已跳过", "; {n} already here, skipped"),
    "import_duplicates": ("已存在的对话", "Conversations already here"),
    "import_skip": ("跳过", "skip"),
    "import_keep_both": ("保留两份", "keep both"),
}


def t(key: str, lang: str, **values: object) -> str:
    """The label `key` in `lang` (Chinese for an unknown language), with `values` filled in."""
    zh, en = LABELS[key]
    text = en if lang == "en" else zh
    return text.format(**values) if values else text
