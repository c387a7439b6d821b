--- difill for Neovim: starts `difill serve` as a language server, asks it for
--- textDocument/inlineCompletion while you type, and shows the answer as ghost text (extmarks with
--- virtual text) that you accept whole, word by word or line by line.
---
--- One server process serves every buffer (the model is loaded once). The suggestion state is
--- global because only one insert-mode cursor exists at a time.
local config_mod = require('difill.config')
local text = require('difill.text')

local api = vim.api
local uv = vim.uv or vim.loop
local has_011 = vim.fn.has('nvim-0.11') == 1

local M = {}

--- Namespace of the ghost-text extmarks (tests look for extmarks here).
M.ns = api.nvim_create_namespace('difill')

---@type difill.Config|nil
M.config = nil

local TRIGGER_INVOKED = 1
local TRIGGER_AUTOMATIC = 2
--- Automatic requests wait this long after a keystroke so that keys typed or pasted together
--- make one request. The real debounce (adaptive to typing speed) happens in the server.
local COALESCE_MS = 20

---@class difill.Item
---@field text string text that replaces the range (line breaks normalised to \n)
---@field start_row integer 0-based row where the replaced range starts
---@field start_col integer byte column where the replaced range starts
---@field tail string buffer text after the cursor that the item replaces (same line)
---@field command table|nil LSP command to execute after a whole accept
---@field client_id integer

---@class difill.Suggestion
---@field bufnr integer
---@field items difill.Item[]
---@field index integer the item shown
---@field ghost string|nil the part of the shown item not typed yet
---@field extmark integer|nil
---@field show_index boolean whether to show "(2/3)" after cycling
---@field tick integer|nil the buffer's changedtick when the ghost text was drawn
---@field row integer|nil where the ghost text was drawn (0-based row, byte col)
---@field col integer|nil

local state = {
  enabled = true,
  ---@type difill.Suggestion|nil
  suggestion = nil,
  ---@type {client: table, id: integer}|nil
  pending = nil,
  seq = 0,
  timer = nil,
  --- an automatic request is waiting for its timer
  scheduled = false,
  augroup = nil,
  --- what the status line shows: state is starting, loading, ready, error or stopped
  status = { state = 'stopped', message = '' },
  --- filetypes attached, for :checkhealth
  attached = {},
}

-- Neovim 0.11 turned client functions into methods (client:request); 0.10 has only the fields.
local function client_call(client, name, ...)
  if has_011 then
    return client[name](client, ...)
  end
  return client[name](...)
end

local function log_debug(message)
  vim.lsp.log.debug('difill: ' .. message)
end

local function set_status(new_state, message)
  state.status = { state = new_state, message = message or '' }
  vim.api.nvim_exec_autocmds('User', { pattern = 'DifillStatus', modeline = false })
end

--- The difill client attached to `bufnr`, if any.
---@param bufnr integer|nil
---@return table|nil
function M.get_client(bufnr)
  local clients = vim.lsp.get_clients({ name = 'difill', bufnr = bufnr })
  return clients[1]
end

local function in_insert_mode()
  return api.nvim_get_mode().mode:sub(1, 1) == 'i'
end

-- Byte column of an LSP position character on `line`, in the client's position encoding.
local function byte_col(line, character, encoding)
  if encoding == 'utf-8' then
    return math.min(character, #line)
  end
  local ok, col
  if has_011 then
    ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  else
    ok, col = pcall(vim.str_byteindex, line, character, encoding == 'utf-16')
  end
  if not ok then
    return #line
  end
  return col
end

---------------------------------------------------------------------------------------------------
-- Ghost text
---------------------------------------------------------------------------------------------------

local function clear_extmark()
  local s = state.suggestion
  if s and s.extmark and api.nvim_buf_is_valid(s.bufnr) then
    pcall(api.nvim_buf_del_extmark, s.bufnr, M.ns, s.extmark)
  end
  if s then
    s.extmark = nil
    s.ghost = nil
  end
end

--- Forget the suggestion and its ghost text.
local function clear()
  clear_extmark()
  state.suggestion = nil
end

local function cancel_pending()
  state.scheduled = false
  if state.timer then
    state.timer:stop()
  end
  if state.pending then
    pcall(client_call, state.pending.client, 'cancel_request', state.pending.id)
    state.pending = nil
  end
end

--- What is left of `item` at the cursor (row, col), or nil when the text typed since the item's
--- start no longer matches it.
local function ghost_of(bufnr, item, row, col)
  if row < item.start_row or (row == item.start_row and col < item.start_col) then
    return nil
  end
  local ok, typed = pcall(api.nvim_buf_get_text, bufnr, item.start_row, item.start_col, row, col, {})
  if not ok then
    return nil
  end
  return text.remaining(item.text, table.concat(typed, '\n'))
end

local function render(bufnr, row, col, item, ghost, s)
  local config = M.config
  local lines = text.lines(ghost)
  local line = api.nvim_buf_get_lines(bufnr, row, row + 1, true)[1]
  local tabstop = vim.bo[bufnr].tabstop
  local first = lines[1]
  -- A one-line item that ends with the text it replaces after the cursor (a closing bracket,
  -- say) would show that text twice: leave it to the real text.
  if #lines == 1 and item.tail ~= '' and vim.endswith(first, item.tail)
    and line:sub(col + 1, col + #item.tail) == item.tail then
    first = first:sub(1, #first - #item.tail)
  end
  first = text.expand_tabs(first, vim.fn.strdisplaywidth(line:sub(1, col)), tabstop)
  local index_chunk = s.show_index and #s.items > 1 and { (' (%d/%d)'):format(s.index, #s.items), 'DifillGhostIndex' }
    or nil
  local virt_text = { { first, config.hl_group } }
  local opts = {
    id = s.extmark,
    virt_text = virt_text,
    virt_text_pos = config.virt_text_pos,
    hl_mode = 'combine',
    priority = 200,
  }
  if #lines > 1 then
    local virt_lines = {}
    for i = 2, #lines do
      table.insert(virt_lines, { { text.expand_tabs(lines[i], 0, tabstop), config.hl_group } })
    end
    if index_chunk then
      table.insert(virt_lines[#virt_lines], index_chunk)
    end
    opts.virt_lines = virt_lines
  elseif index_chunk then
    table.insert(virt_text, index_chunk)
  end
  s.extmark = api.nvim_buf_set_extmark(bufnr, M.ns, row, col, opts)
  s.tick = api.nvim_buf_get_changedtick(bufnr)
  s.row, s.col = row, col
end

--- Re-show the suggestion at the current cursor if the buffer still agrees with it (the user may
--- have typed its next characters), else clear it. Returns whether a suggestion is shown.
---@return boolean
local function refresh()
  local s = state.suggestion
  if not s then
    return false
  end
  local bufnr = api.nvim_get_current_buf()
  if bufnr ~= s.bufnr or not in_insert_mode() or not api.nvim_buf_is_valid(bufnr) then
    clear()
    return false
  end
  local cursor = api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  -- Prefer the item on show; fall back to the next one that still matches.
  for offset = 0, #s.items - 1 do
    local index = (s.index - 1 + offset) % #s.items + 1
    local ghost = ghost_of(bufnr, s.items[index], row, col)
    if ghost and ghost ~= '' then
      s.index = index
      s.ghost = ghost
      render(bufnr, row, col, s.items[index], ghost, s)
      return true
    end
  end
  clear()
  return false
end

--- Whether a suggestion is shown in the current buffer.
---@return boolean
function M.is_visible()
  local s = state.suggestion
  return s ~= nil and s.ghost ~= nil and s.bufnr == api.nvim_get_current_buf()
end

--- Whether an inline-completion request is waiting for the server (for statusline spinners).
---@return boolean
function M.is_pending()
  return state.pending ~= nil or state.scheduled
end

--- The text not yet typed of the suggestion on show (nil when none is shown). For statuslines,
--- tests and other plugins.
---@return string|nil
function M.get_suggestion()
  if M.is_visible() then
    return state.suggestion.ghost
  end
  return nil
end

---------------------------------------------------------------------------------------------------
-- Requests
---------------------------------------------------------------------------------------------------

-- Turn the server's InlineCompletionItems into byte-based items. `cursor` is where the request
-- was made (0-based row, byte col).
local function normalize(bufnr, client, result, cursor)
  local raw_items = result and (result.items or result) or {}
  if type(raw_items) ~= 'table' then
    return {}
  end
  local encoding = client.offset_encoding or 'utf-16'
  local items = {}
  for _, raw in ipairs(raw_items) do
    local insert = raw.insertText
    local value
    if type(insert) == 'string' then
      value = insert
    elseif type(insert) == 'table' and type(insert.value) == 'string' then
      value = insert.kind == 'snippet' and text.snippet_text(insert.value) or insert.value
    end
    if value then
      value = value:gsub('\r\n', '\n')
      local item = { text = value, tail = '', command = raw.command, client_id = client.id }
      local range = raw.range
      if type(range) == 'table' and range.start and range['end'] then
        local start_line = api.nvim_buf_get_lines(bufnr, range.start.line, range.start.line + 1, false)[1] or ''
        item.start_row = range.start.line
        item.start_col = byte_col(start_line, range.start.character, encoding)
        if range['end'].line == cursor[1] then
          local line = api.nvim_buf_get_lines(bufnr, cursor[1], cursor[1] + 1, false)[1] or ''
          local end_col = byte_col(line, range['end'].character, encoding)
          if end_col > cursor[2] then
            item.tail = line:sub(cursor[2] + 1, end_col)
          end
        end
      else
        item.start_row, item.start_col = cursor[1], cursor[2]
      end
      local before = item.start_row < cursor[1] or (item.start_row == cursor[1] and item.start_col <= cursor[2])
      if before and value ~= '' then
        table.insert(items, item)
      end
    end
  end
  return items
end

local function on_result(bufnr, client, cursor, result)
  if not api.nvim_buf_is_valid(bufnr) or api.nvim_get_current_buf() ~= bufnr or not in_insert_mode() then
    return
  end
  local items = normalize(bufnr, client, result, cursor)
  clear()
  if #items == 0 then
    return
  end
  state.suggestion = { bufnr = bufnr, items = items, index = 1, show_index = false }
  refresh()
end

--- Show `result` (InlineCompletionItem[] or InlineCompletionList, as the server sends them) at
--- the cursor of the current buffer, as if the server had just answered. Lets tests check the
--- ghost text and the accept keys on known items, and lets other code feed suggestions in.
---@param result table
---@param client table|nil the client whose offset_encoding and id apply (default: utf-16, none)
function M.show_result(result, client)
  local bufnr = api.nvim_get_current_buf()
  local cursor = api.nvim_win_get_cursor(0)
  client = client or M.get_client(bufnr) or { id = -1, offset_encoding = 'utf-16' }
  on_result(bufnr, client, { cursor[1] - 1, cursor[2] }, result)
end

--- Ask the server for inline completions at the cursor now.
---@param trigger_kind integer|nil 1 = invoked by the user (default), 2 = automatic
function M.request(trigger_kind)
  trigger_kind = trigger_kind or TRIGGER_INVOKED
  cancel_pending()
  local bufnr = api.nvim_get_current_buf()
  local client = M.get_client(bufnr)
  if not client then
    if trigger_kind == TRIGGER_INVOKED then
      vim.notify('difill: no server attached to this buffer (see :checkhealth difill)', vim.log.levels.WARN)
    end
    return
  end
  local win = api.nvim_get_current_win()
  local cursor = api.nvim_win_get_cursor(win)
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = trigger_kind }
  state.seq = state.seq + 1
  local seq = state.seq
  local ok, id = client_call(client, 'request', 'textDocument/inlineCompletion', params, function(err, result)
    if seq ~= state.seq then
      return -- a newer request superseded this one
    end
    state.pending = nil
    if err then
      log_debug('inlineCompletion failed: ' .. vim.inspect(err))
      if trigger_kind == TRIGGER_INVOKED and err.code ~= -32800 then -- -32800: RequestCancelled
        vim.notify('difill: ' .. tostring(err.message), vim.log.levels.WARN)
      end
      return
    end
    on_result(bufnr, client, { cursor[1] - 1, cursor[2] }, result)
  end, bufnr)
  if ok and id then
    state.pending = { client = client, id = id }
  end
end

--- Manual trigger: request at once, ignoring the debounce.
function M.trigger()
  if M.config and M.config.use_builtin and vim.lsp.inline_completion then
    vim.lsp.inline_completion.get()
    return
  end
  M.request(TRIGGER_INVOKED)
end

local function schedule_request()
  if not state.timer then
    state.timer = uv.new_timer()
  end
  state.timer:stop()
  local bufnr = api.nvim_get_current_buf()
  local tick = api.nvim_buf_get_changedtick(bufnr)
  state.scheduled = true
  state.timer:start(COALESCE_MS, 0, vim.schedule_wrap(function()
    state.scheduled = false
    -- Typing went on, the buffer changed or insert mode ended: this request is stale.
    if not state.enabled or api.nvim_get_current_buf() ~= bufnr or not in_insert_mode()
      or api.nvim_buf_get_changedtick(bufnr) ~= tick then
      return
    end
    M.request(TRIGGER_AUTOMATIC)
  end))
end

---------------------------------------------------------------------------------------------------
-- Accepting, dismissing, cycling
---------------------------------------------------------------------------------------------------

local function execute_command(client, command, bufnr)
  if type(command) ~= 'table' or type(command.command) ~= 'string' then
    return
  end
  client_call(client, 'request', 'workspace/executeCommand',
    { command = command.command, arguments = command.arguments }, function(err)
      if err then
        log_debug(('command %s failed: %s'):format(command.command, vim.inspect(err)))
      end
    end, bufnr)
end

local function notify_partial(client, bufnr, item, accepted_length)
  -- The server knows its items by the id that its difill.accept command carries.
  local arguments = type(item.command) == 'table' and item.command.arguments or nil
  if type(arguments) ~= 'table' or arguments[1] == nil then
    return
  end
  local params = { itemId = arguments[1], acceptedLength = accepted_length }
  client_call(client, 'notify', 'difill/didPartiallyAccept', params)
end

--- Insert the suggestion shown, or its next word or line.
---@param what 'all'|'word'|'line'|nil
---@return boolean accepted whether anything was inserted
function M.accept(what)
  what = what or 'all'
  if not M.is_visible() then
    return false
  end
  local s = state.suggestion
  local bufnr = s.bufnr
  local item = s.items[s.index]
  local ghost = s.ghost
  local piece = ghost
  if what == 'word' then
    piece = text.next_word(ghost)
  elseif what == 'line' then
    piece = text.next_line(ghost)
  end
  local whole = piece == ghost
  local cursor = api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local line = api.nvim_buf_get_lines(bufnr, row, row + 1, true)[1]
  local replace = 0
  if whole and item.tail ~= '' and line:sub(col + 1, col + #item.tail) == item.tail then
    replace = #item.tail
  end
  if whole then
    clear()
  else
    clear_extmark()
  end
  local lines = text.lines(piece)
  api.nvim_buf_set_text(bufnr, row, col, row, col + replace, lines)
  local end_row = row + #lines - 1
  local end_col = (#lines == 1 and col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  local client = vim.lsp.get_client_by_id(item.client_id)
  if whole then
    if client and item.command then
      execute_command(client, item.command, bufnr)
    end
  else
    if client then
      -- acceptedLength counts characters (code points) from the item's start, not bytes.
      notify_partial(client, bufnr, item, vim.fn.strchars(item.text:sub(1, #item.text - #ghost + #piece)))
    end
    refresh()
  end
  return true
end

function M.accept_word()
  return M.accept('word')
end

function M.accept_line()
  return M.accept('line')
end

--- Hide the suggestion (it comes back on the next edit when auto_trigger is on).
function M.dismiss()
  cancel_pending()
  clear()
end

--- Show the next (count 1) or previous (count -1) candidate.
---@param count integer|nil
function M.cycle(count)
  count = count or 1
  if M.config and M.config.use_builtin and vim.lsp.inline_completion then
    local jump = vim.lsp.inline_completion.select or vim.lsp.inline_completion.jump
    if jump then
      jump({ count = count })
    end
    return
  end
  local s = state.suggestion
  if not s then
    M.request(TRIGGER_INVOKED)
    return
  end
  if #s.items < 2 then
    return
  end
  s.index = (s.index - 1 + count) % #s.items + 1
  s.show_index = true
  refresh()
end

function M.next()
  M.cycle(1)
end

function M.prev()
  M.cycle(-1)
end

---------------------------------------------------------------------------------------------------
-- Events
---------------------------------------------------------------------------------------------------

local function attached(bufnr)
  return M.get_client(bufnr) ~= nil
end

local function on_text_changed()
  if refresh() then
    return -- the user typed what the suggestion said: keep showing the rest
  end
  local bufnr = api.nvim_get_current_buf()
  if not state.enabled or not attached(bufnr) or (M.config.use_builtin and vim.lsp.inline_completion) then
    return
  end
  if M.config.auto_trigger then
    schedule_request()
  end
end

local function on_cursor_moved()
  local s = state.suggestion
  if not s then
    return
  end
  -- The cursor moved without an edit (arrow keys, mouse): the suggestion belonged elsewhere.
  local cursor = api.nvim_win_get_cursor(0)
  if s.bufnr == api.nvim_get_current_buf() and s.tick == api.nvim_buf_get_changedtick(s.bufnr)
    and (cursor[1] - 1 ~= s.row or cursor[2] ~= s.col) then
    clear()
    return
  end
  refresh()
end

local function on_leave()
  cancel_pending()
  clear()
end

---------------------------------------------------------------------------------------------------
-- The language server
---------------------------------------------------------------------------------------------------

--- $/progress from the server (work-done progress, e.g. while the model loads).
local function on_progress(value)
  local message = value.message or value.title or ''
  if value.kind == 'end' then
    M.refresh_status()
  else
    if type(value.percentage) == 'number' then
      message = ('%s %d%%'):format(message, value.percentage)
    end
    set_status('loading', message)
  end
end

--- Ask the server for difill/status and update what M.status() shows (model state and message).
function M.refresh_status()
  local client = M.get_client()
  if not client then
    return
  end
  client_call(client, 'request', 'difill/status', vim.empty_dict(), function(err, result)
    if err or type(result) ~= 'table' or type(result.model) ~= 'table' then
      return
    end
    local model = result.model
    local message = model.message ~= vim.NIL and model.message or ''
    if model.state == 'ready' and type(model.name) == 'string' then
      message = ('%s, %s, %s'):format(model.name, tostring(model.backend), tostring(model.device))
    end
    set_status(tostring(model.state), message)
    if model.state == 'error' or model.state == 'failed' then
      vim.notify('difill: ' .. tostring(message), vim.log.levels.ERROR)
    end
  end)
end

local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  caps.textDocument = caps.textDocument or {}
  caps.textDocument.inlineCompletion = { dynamicRegistration = false }
  return caps
end

local function lsp_config()
  local config = M.config
  local settings = config_mod.server_settings(config)
  return {
    name = 'difill',
    cmd = config_mod.server_cmd(config),
    cmd_env = config.cmd_env,
    root_dir = vim.fn.getcwd(),
    init_options = settings,
    settings = { difill = settings },
    capabilities = capabilities(),
    flags = { debounce_text_changes = 0 },
    on_init = function(client)
      log_debug('server started: ' .. vim.inspect(client.server_capabilities))
      vim.schedule(M.refresh_status)
    end,
    on_exit = function(code, signal)
      vim.schedule(function()
        clear()
        if code ~= 0 and signal ~= 15 and signal ~= 9 then
          set_status('error', ('server exited with code %d'):format(code))
          vim.notify(('difill: the server exited with code %d; see :checkhealth difill and :LspLog'):format(code),
            vim.log.levels.ERROR)
        else
          set_status('stopped', '')
        end
      end)
    end,
  }
end

local function should_attach(bufnr)
  local config = M.config
  if not state.enabled or not api.nvim_buf_is_valid(bufnr) or vim.bo[bufnr].buftype ~= '' then
    return false
  end
  local filetype = vim.bo[bufnr].filetype
  if filetype == '' then
    return false
  end
  return config.languages == '*' or vim.tbl_contains(config.languages, filetype)
end

--- Start the server if needed and attach it to `bufnr` (when its filetype is enabled).
---@param bufnr integer|nil
---@return integer|nil client_id
function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
  if not M.config or not should_attach(bufnr) then
    return nil
  end
  if not M.get_client() then
    set_status('starting', '')
  end
  local client_id = vim.lsp.start(lsp_config(), {
    bufnr = bufnr,
    reuse_client = function(client, conf)
      return client.name == conf.name
    end,
  })
  if client_id then
    state.attached[vim.bo[bufnr].filetype] = true
    if M.config.use_builtin and vim.lsp.inline_completion then
      vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
    end
  end
  return client_id
end

--- Send changed options to the running server (workspace/didChangeConfiguration).
---@param opts table options as for setup{}
function M.configure(opts)
  local merged = vim.tbl_deep_extend('force', vim.deepcopy(M.config or {}), opts or {})
  if opts and opts.languages ~= nil then
    merged.languages = opts.languages
  end
  M.config = config_mod.resolve(merged)
  local client = M.get_client()
  if client then
    local settings = config_mod.server_settings(M.config)
    client.settings = { difill = settings }
    client_call(client, 'notify', 'workspace/didChangeConfiguration', { settings = { difill = settings } })
  end
end

--- Stop the server (it restarts on the next buffer that needs it).
function M.stop()
  on_leave()
  for _, client in ipairs(vim.lsp.get_clients({ name = 'difill' })) do
    client_call(client, 'stop')
  end
  set_status('stopped', '')
end

function M.enable()
  state.enabled = true
  for _, bufnr in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(bufnr) then
      M.attach(bufnr)
    end
  end
end

function M.disable()
  state.enabled = false
  on_leave()
end

function M.toggle()
  if state.enabled then
    M.disable()
  else
    M.enable()
  end
end

function M.is_enabled()
  return state.enabled
end

--- A short text for the status line, e.g. "difill: ready" or "difill: loading model 40%".
---@return string
function M.status()
  local s = state.status
  if s.message ~= '' then
    return ('difill: %s (%s)'):format(s.state, s.message)
  end
  return 'difill: ' .. s.state
end

--- The status table { state = ..., message = ... } and the filetypes attached so far.
function M.status_info()
  return vim.deepcopy(state.status), vim.tbl_keys(state.attached)
end

---------------------------------------------------------------------------------------------------
-- Setup
---------------------------------------------------------------------------------------------------

local function set_keymaps()
  local keys = M.config.keymaps
  -- Keys that mean something else in insert mode fall back to that meaning when no suggestion is
  -- shown; the others always act.
  local function map(name, fn_name, fallback)
    local lhs = keys[name]
    if not lhs then
      return
    end
    vim.keymap.set('i', lhs, function()
      if fallback and not M.is_visible() and not (M.config.use_builtin and vim.lsp.inline_completion) then
        return lhs
      end
      return ('<Cmd>lua require("difill").%s()<CR>'):format(fn_name)
    end, { expr = true, replace_keycodes = true, silent = true, desc = 'difill: ' .. name:gsub('_', ' ') })
  end
  map('accept', 'accept_key', true)
  map('accept_word', 'accept_word', true)
  map('accept_line', 'accept_line', true)
  map('dismiss', 'dismiss', true)
  map('next', 'next', false)
  map('prev', 'prev', false)
  map('trigger', 'trigger', false)
end

--- What the accept key does: the builtin's accept on 0.12 with use_builtin, else ours.
function M.accept_key()
  if M.config.use_builtin and vim.lsp.inline_completion then
    vim.lsp.inline_completion.get()
    return
  end
  M.accept('all')
end

--- Configure the plugin, start the server for the buffers of the enabled languages and map the
--- keys. Calling it again replaces the options.
---@param opts table|nil see README.md for every option
function M.setup(opts)
  if vim.fn.has('nvim-0.10') ~= 1 then
    vim.notify('difill needs Neovim 0.10 or later', vim.log.levels.ERROR)
    return
  end
  M.config = config_mod.resolve(opts)
  if M.config.use_builtin and not vim.lsp.inline_completion then
    vim.notify('difill: use_builtin needs Neovim 0.12 (vim.lsp.inline_completion); using the plugin\'s ghost text',
      vim.log.levels.WARN)
  end
  api.nvim_set_hl(0, 'DifillGhost', { link = 'Comment', default = true })
  api.nvim_set_hl(0, 'DifillGhostIndex', { link = 'NonText', default = true })

  state.augroup = api.nvim_create_augroup('difill', { clear = true })
  local group = state.augroup
  api.nvim_create_autocmd('FileType', {
    group = group,
    callback = function(args)
      M.attach(args.buf)
    end,
  })
  api.nvim_create_autocmd('TextChangedI', { group = group, callback = on_text_changed })
  api.nvim_create_autocmd('CursorMovedI', { group = group, callback = on_cursor_moved })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave', 'WinLeave' }, { group = group, callback = on_leave })
  api.nvim_create_autocmd('LspProgress', {
    group = group,
    callback = function(args)
      local data = args.data or {}
      local client = data.client_id and vim.lsp.get_client_by_id(data.client_id)
      local value = data.params and data.params.value
      if client and client.name == 'difill' and type(value) == 'table' then
        on_progress(value)
      end
    end,
  })
  set_keymaps()

  for _, bufnr in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(bufnr) then
      M.attach(bufnr)
    end
  end
end

return M
