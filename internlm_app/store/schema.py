"""The conversation store's schema, as the ordered list of its migrations."""

from __future__ import annotations

# Each step moves the schema from version i to i + 1; steps are only ever appended, never edited.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            system_prompt TEXT NOT NULL DEFAULT '',
            settings TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created_at REAL NOT NULL,
            status TEXT NOT NULL DEFAULT 'complete'
                CHECK (status IN ('complete', 'streaming', 'stopped', 'error')),
            stats TEXT
        )""",
    ),
    (
        "CREATE INDEX messages_by_conversation ON messages (conversation_id, id)",
        "CREATE INDEX conversations_by_update ON conversations (updated_at)",
    ),
    (
        # Reply versions and branches: messages form a tree per conversation. A linear chat of an older file becomes
        # the chain where each message's parent is the one before it, and its selected leaf is its last message.
        # No ON DELETE CASCADE: SQLite runs a cascade as nested triggers, and a chain of 1000 messages would pass its
        # trigger depth limit. A subtree is deleted in one statement instead (store_tree.delete_subtree).
        "ALTER TABLE messages ADD COLUMN parent_id INTEGER REFERENCES messages(id)",
        # When the message was last created or selected as a leaf (a per-conversation counter): `select` follows it
        # down to the most recently used leaf below a version.
        "ALTER TABLE messages ADD COLUMN selected_seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN feedback INTEGER CHECK (feedback IN (0, 1))",
        "ALTER TABLE conversations ADD COLUMN leaf_id INTEGER",
        """UPDATE messages SET selected_seq = id, parent_id = (
            SELECT max(p.id) FROM messages p WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id
        )""",
        """UPDATE conversations SET leaf_id = (
            SELECT max(m.id) FROM messages m WHERE m.conversation_id = conversations.id
        )""",
        "CREATE INDEX messages_by_parent ON messages (parent_id)",
        """CREATE TABLE attachments (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            mime_type TEXT NOT NULL,
            text TEXT NOT NULL DEFAULT '',
            tokens INTEGER NOT NULL DEFAULT 0 CHECK (tokens >= 0)
        )""",
        "CREATE INDEX attachments_by_message ON attachments (message_id, id)",
        """CREATE TABLE presets (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            system_prompt TEXT NOT NULL,
            language TEXT NOT NULL DEFAULT 'both' CHECK (language IN ('zh', 'en', 'both')),
            UNIQUE (name, language)
        )""",
        # The default presets are seeded here, once per file: a default a user deletes stays deleted.
        """INSERT INTO presets (name, system_prompt, language) VALUES
            ('翻译', '你是一名专业翻译。把用户给出的中文译成英文、其他语言译成中文，'
                || '只输出译文，保留原文的格式。', 'zh'),
            ('代码审查', '你是一名资深代码审查者。指出代码中的错误、安全问题和可读性问题，'
                || '按严重程度排序，并给出修改建议。', 'zh'),
            ('简洁助手', '你是一个简洁的助手。直接回答问题，不寒暄，不重复问题，'
                || '能用一句话说清的就用一句话。', 'zh'),
            ('Translator', 'You are a professional translator. Translate English text into Chinese and text in any'
                || ' other language into English. Output only the translation and keep the original formatting.', 'en'),
            ('Code reviewer', 'You are a senior code reviewer. Point out bugs, security problems and unclear code,'
                || ' most severe first, and suggest a fix for each.', 'en'),
            ('Concise assistant', 'You are a concise assistant. Answer directly, without pleasantries or restating'
                || ' the question; use one sentence when one is enough.', 'en')""",
    ),
    (
        # Messages typed while a reply of the conversation ran: sent, oldest first, once it has ended; kept here so
        # that a reload, a closed tab or a restart never loses one (store/queued.py).
        """CREATE TABLE queued_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            content TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX queued_by_conversation ON queued_messages (conversation_id, id)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
