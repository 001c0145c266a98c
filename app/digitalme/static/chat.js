// DigitalMe web chat: talks to /api/v1 with the pasted bearer token.
// No framework and no build step; text is always inserted as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("digitalme.token"), conversation: null, busy: false };

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${state.token}` }, options.headers || {});
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.message) message = body.message;
    } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function show(element, visible) { element.hidden = !visible; }

function showError(element, message) {
  element.textContent = message;
  show(element, Boolean(message));
}

function formatTime(iso) {
  const date = new Date(iso);
  return isNaN(date) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function addMessage(role, text, createdAt) {
  const empty = $("messages").querySelector(".empty");
  if (empty) empty.remove();
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.appendChild(body);
  if (createdAt) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = formatTime(createdAt);
    item.appendChild(meta);
  }
  $("messages").appendChild(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function showEmpty() {
  $("messages").replaceChildren();
  const empty = document.createElement("li");
  empty.className = "empty";
  empty.textContent = "Say hello — the clone answers in its owner's voice.";
  $("messages").appendChild(empty);
}

async function loadConversations() {
  const response = await api("/api/v1/conversations?limit=50");
  const { conversations } = await response.json();
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of conversations) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = conversation.title || `Conversation ${formatTime(conversation.created_at)}`;
    button.title = conversation.created_at;
    if (state.conversation === conversation.id) button.classList.add("active");
    button.addEventListener("click", () => openConversation(conversation));
    item.appendChild(button);
    list.appendChild(item);
  }
}

async function openConversation(conversation) {
  state.conversation = conversation.id;
  $("chat-title").textContent = conversation.title || "Conversation";
  const response = await api(`/api/v1/conversations/${conversation.id}/messages?limit=200`);
  const { messages } = await response.json();
  $("messages").replaceChildren();
  if (!messages.length) showEmpty();
  for (const message of messages) addMessage(message.role, message.text, message.created_at);
  await loadConversations();
}

async function newConversation(title) {
  const response = await api("/api/v1/conversations", {
    method: "POST", body: JSON.stringify(title ? { title } : {}),
  });
  const conversation = await response.json();
  state.conversation = conversation.id;
  $("chat-title").textContent = conversation.title || "New conversation";
  showEmpty();
  await loadConversations();
  return conversation;
}

// Reads a server-sent event stream from a fetch() response and calls onEvent(name, data).
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let boundary;
    while ((boundary = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      let event = "message";
      const data = [];
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

async function send(text) {
  if (!state.conversation) await newConversation(text.slice(0, 60));
  const mine = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  $("chat-status").textContent = "typing…";
  const replyText = reply.querySelector(".text");
  try {
    const response = await api(`/api/v1/conversations/${state.conversation}/messages`, {
      method: "POST", body: JSON.stringify({ text }), headers: { Accept: "text/event-stream" },
    });
    await readEvents(response, (event, data) => {
      if (event === "delta") {
        replyText.textContent += data.text;
        reply.scrollIntoView({ block: "end" });
      } else if (event === "done") {
        replyText.textContent = data.reply.text;
        const meta = document.createElement("span");
        meta.className = "meta";
        meta.textContent = formatTime(data.reply.created_at);
        reply.appendChild(meta);
      } else if (event === "message") {
        const meta = document.createElement("span");
        meta.className = "meta";
        meta.textContent = formatTime(data.created_at);
        mine.appendChild(meta);
      } else if (event === "error") {
        throw new Error(data.message);
      }
    });
  } catch (error) {
    if (!replyText.textContent) reply.remove();
    showError($("chat-error"), error.message);
  } finally {
    reply.classList.remove("streaming");
    $("chat-status").textContent = "online";
  }
}

async function connect(token) {
  state.token = token;
  const response = await api("/api/v1/me");
  const me = await response.json();
  sessionStorage.setItem("digitalme.token", token);
  const name = me.clone.name || "the clone";
  $("clone-name").textContent = name;
  $("avatar").textContent = name.split(/\s+/).map((part) => part[0]).join("").slice(0, 2).toUpperCase();
  $("who").textContent = `Signed in as ${me.token.name} (${me.token.scope})`;
  $("text").placeholder = `Message ${name}…  (Enter to send, Shift+Enter for a new line)`;
  show($("connect"), false);
  show($("chat"), true);
  show($("sign-out"), true);
  $("new-conversation").disabled = false;
  showEmpty();
  await loadConversations();
  $("text").focus();
}

function signOut() {
  sessionStorage.removeItem("digitalme.token");
  location.reload();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    showError($("connect-error"), "");
    try {
      await connect($("token").value.trim());
    } catch (error) {
      state.token = null;
      showError($("connect-error"), error.status === 401 ? "That token is not valid." : error.message);
    }
  });
  $("composer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    if (!text || state.busy) return;
    state.busy = true;
    $("send").disabled = true;
    showError($("chat-error"), "");
    $("text").value = "";
    try {
      await send(text);
    } finally {
      state.busy = false;
      $("send").disabled = false;
      $("text").focus();
    }
  });
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("new-conversation").addEventListener("click", async () => {
    showError($("chat-error"), "");
    try { await newConversation(); } catch (error) { showError($("chat-error"), error.message); }
  });
  $("sign-out").addEventListener("click", signOut);
  if (state.token) connect(state.token).catch(() => signOut());
});
