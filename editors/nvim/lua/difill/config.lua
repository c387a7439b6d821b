--- Options of the difill plugin: the defaults, merging the user's `setup{}` table over them,
--- and the two views the language server gets of them (initializationOptions and the
--- settings sent with workspace/didChangeConfiguration).
---
--- The server-side keys are camelCase because they are the protocol's keys (docs/protocol.md);
--- the Lua-side keys are snake_case like every other Neovim plugin option.
local M = {}

--- Languages with a tree-sitter grammar in difill (the server completes others too, without
--- the syntax constraint). These are Neovim filetypes, which match LSP language ids here.
M.default_languages = {
  'python',
  'javascript',
  'javascriptreact',
  'typescript',
  'typescriptreact',
  'go',
  'rust',
  'java',
  'c',
  'cpp',
}

---@class difill.Keymaps
---@field accept string|false
---@field accept_word string|false
---@field accept_line string|false
---@field dismiss string|false
---@field next string|false
---@field prev string|false
---@field trigger string|false

---@class difill.Config
M.defaults = {
  --- Command that starts the language server (LSP over stdio).
  cmd = { 'difill', 'serve' },
  --- Command printing `difill info --json`, for :checkhealth; nil derives it from `cmd`.
  info_cmd = nil,
  --- Extra environment for the server process.
  cmd_env = nil,
  --- Model directory; nil uses the model bundled with difill.
  model = nil,
  --- 'torch' or 'onnx'.
  backend = 'torch',
  --- 'cpu' or 'cuda'.
  device = 'cpu',
  --- 'float32', 'bfloat16', 'float16' or 'int8' (CPU) weights; nil: bfloat16 on CUDA, float16 on the CPU.
  dtype = nil,
  --- Fixed number of denoising steps; nil lets the server stop on its confidence threshold.
  steps = nil,
  --- Largest completion in tokens; nil uses the server's default.
  max_tokens = nil,
  --- 'auto' lets the server choose between completing the line and a block; 'line' or 'block'
  --- force one.
  mode = 'auto',
  --- Suggestions per request (1-8); next/prev cycle through them.
  candidates = 1,
  --- Turn the tree-sitter syntax constraint on or off.
  constrain_syntax = true,
  --- Filetypes to attach to, or '*' for every buffer with a filetype.
  languages = M.default_languages,
  --- Request a suggestion automatically while typing in insert mode.
  auto_trigger = true,
  --- Delay before answering an automatic trigger, in ms. nil: the server adapts it to your
  --- typing speed and the model's latency (adaptiveDebounce); a number fixes it.
  debounce_ms = nil,
  --- Where the first line of the ghost text goes: 'inline' (pushes the rest of the line
  --- right), 'eol' or 'overlay'.
  virt_text_pos = 'inline',
  --- Highlight group of the ghost text.
  hl_group = 'DifillGhost',
  --- On Neovim 0.12+, use vim.lsp.inline_completion instead of this plugin's ghost text
  --- (no accept-word/accept-line there; the keys accept, next, prev and trigger still work).
  use_builtin = false,
  --- Insert-mode keys; false turns one off. accept/accept_word/accept_line/dismiss fall back
  --- to the key's usual meaning when no suggestion is shown.
  keymaps = {
    accept = '<Tab>',
    accept_word = '<M-Right>',
    accept_line = '<M-C-Right>',
    dismiss = '<C-]>',
    next = '<M-]>',
    prev = '<M-[>',
    trigger = '<M-\\>',
  },
  --- Log level of the server process ('DEBUG', 'INFO', 'WARNING', 'ERROR').
  log_level = nil,
  --- Also write the server's log to this file.
  log_file = nil,
}

--- Every option name, including those whose default is nil (absent from M.defaults).
M.known = { info_cmd = true, cmd_env = true, model = true, dtype = true, steps = true, max_tokens = true, debounce_ms = true,
  log_level = true, log_file = true }
for key in pairs(M.defaults) do
  M.known[key] = true
end

local function is_list_of_strings(value)
  if type(value) ~= 'table' then
    return false
  end
  for _, v in ipairs(value) do
    if type(v) ~= 'string' then
      return false
    end
  end
  return true
end

--- Merge `user` over the defaults and check every option, so that a typo gives one clear error
--- at setup time instead of a confusing failure on the first keystroke.
---@param user table|nil
---@return difill.Config
function M.resolve(user)
  user = user or {}
  if type(user) ~= 'table' then
    error('difill.setup: expected a table of options, got ' .. type(user), 0)
  end
  for key in pairs(user) do
    if not M.known[key] then
      local names = vim.tbl_keys(M.known)
      table.sort(names)
      error(('difill.setup: unknown option %q (known: %s)'):format(key, table.concat(names, ', ')), 0)
    end
  end
  local config = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), user)
  -- A user list replaces the default list instead of being merged index by index.
  if user.languages ~= nil then
    config.languages = user.languages
  end
  if type(user.cmd) == 'table' then
    config.cmd = user.cmd
  end

  local function check(name, ok, expected)
    if not ok then
      error(('difill.setup: option %s must be %s, got %s'):format(name, expected, vim.inspect(config[name])), 0)
    end
  end
  check('cmd', is_list_of_strings(config.cmd) and #config.cmd > 0 or type(config.cmd) == 'string', 'a list of strings')
  if type(config.cmd) == 'string' then
    config.cmd = { config.cmd, 'serve' }
  end
  check('info_cmd', config.info_cmd == nil or is_list_of_strings(config.info_cmd), 'a list of strings')
  check('model', config.model == nil or type(config.model) == 'string', 'a path')
  check('backend', config.backend == 'torch' or config.backend == 'onnx', "'torch' or 'onnx'")
  check('device', config.device == 'cpu' or config.device == 'cuda', "'cpu' or 'cuda'")
  check('dtype', config.dtype == nil or config.dtype == 'float32' or config.dtype == 'bfloat16' or config.dtype == 'float16'
    or config.dtype == 'int8', "nil, 'float32', 'bfloat16', 'float16' or 'int8'")
  check('steps', config.steps == nil or (type(config.steps) == 'number' and config.steps >= 1), 'nil or a number >= 1')
  check('max_tokens', config.max_tokens == nil or (type(config.max_tokens) == 'number' and config.max_tokens >= 1),
    'nil or a number >= 1')
  check('mode', vim.tbl_contains({ 'auto', 'line', 'block' }, config.mode), "'auto', 'line' or 'block'")
  check('candidates', type(config.candidates) == 'number' and config.candidates >= 1 and config.candidates <= 8,
    'a number from 1 to 8')
  check('constrain_syntax', type(config.constrain_syntax) == 'boolean', 'true or false')
  check('languages', config.languages == '*' or is_list_of_strings(config.languages), "'*' or a list of filetypes")
  check('auto_trigger', type(config.auto_trigger) == 'boolean', 'true or false')
  check('debounce_ms', config.debounce_ms == nil or (type(config.debounce_ms) == 'number' and config.debounce_ms >= 0),
    'nil or a number >= 0')
  check('virt_text_pos', vim.tbl_contains({ 'inline', 'eol', 'overlay' }, config.virt_text_pos),
    "'inline', 'eol' or 'overlay'")
  check('hl_group', type(config.hl_group) == 'string', 'a highlight group name')
  check('use_builtin', type(config.use_builtin) == 'boolean', 'true or false')
  check('keymaps', type(config.keymaps) == 'table', 'a table')
  for name, key in pairs(config.keymaps) do
    if M.defaults.keymaps[name] == nil then
      error(('difill.setup: unknown keymap %q (known: %s)'):format(name,
        table.concat(vim.tbl_keys(M.defaults.keymaps), ', ')), 0)
    end
    if key ~= false and type(key) ~= 'string' then
      error(('difill.setup: keymaps.%s must be a key string or false'):format(name), 0)
    end
  end
  return config
end

--- The server's view of the options: the `initializationOptions` of the initialize request,
--- and the `difill` section of workspace/didChangeConfiguration. Keys follow docs/protocol.md.
---@param config difill.Config
---@return table
function M.server_settings(config)
  local languages = config.languages
  if languages == '*' then
    languages = vim.NIL
  end
  -- nil options travel as JSON null, which the server reads as "its default", so that
  -- clearing an option at run time (configure{}) resets it there too.
  local settings = {
    model = config.model or vim.NIL,
    backend = config.backend,
    device = config.device,
    dtype = config.dtype or vim.NIL,
    steps = config.steps or vim.NIL,
    maxTokens = config.max_tokens or vim.NIL,
    mode = config.mode,
    candidates = config.candidates,
    constrainSyntax = config.constrain_syntax,
    languages = languages,
    adaptiveDebounce = config.debounce_ms == nil,
  }
  if config.debounce_ms ~= nil then
    settings.debounceMs = config.debounce_ms
  end
  return settings
end

--- The `difill info --json` command for :checkhealth: the server command with `serve` replaced,
--- so that a custom `cmd` (a virtualenv's python -m difill, say) is asked, not whatever is on PATH.
---@param config difill.Config
---@return string[]
function M.info_cmd(config)
  if config.info_cmd then
    return config.info_cmd
  end
  local cmd = {}
  local replaced = false
  for _, arg in ipairs(config.cmd) do
    if arg == 'serve' and not replaced then
      vim.list_extend(cmd, { 'info', '--json' })
      replaced = true
    else
      table.insert(cmd, arg)
    end
  end
  if not replaced then
    vim.list_extend(cmd, { 'info', '--json' })
  end
  if config.model then
    vim.list_extend(cmd, { '--model', config.model })
  end
  vim.list_extend(cmd, { '--backend', config.backend, '--device', config.device })
  if config.dtype then
    vim.list_extend(cmd, { '--dtype', config.dtype })
  end
  return cmd
end

--- The full server command line (cmd plus the logging options).
---@param config difill.Config
---@return string[]
function M.server_cmd(config)
  local cmd = vim.deepcopy(config.cmd)
  if config.log_level then
    vim.list_extend(cmd, { '--log-level', config.log_level })
  end
  if config.log_file then
    vim.list_extend(cmd, { '--log-file', config.log_file })
  end
  return cmd
end

return M
