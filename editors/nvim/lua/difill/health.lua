--- :checkhealth difill. Reports what a user needs to know when no ghost text shows up: whether the
--- server command runs, which model, backend and device it loads, and what the running server
--- says about itself (difill/status).
local M = {}

local health = vim.health

local function describe(info)
  local parts = {}
  for _, key in ipairs({ 'version', 'model_path', 'name', 'backend', 'device', 'n_params' }) do
    if info[key] ~= nil and info[key] ~= vim.NIL then
      table.insert(parts, ('%s: %s'):format(key, tostring(info[key])))
    end
  end
  return table.concat(parts, ', ')
end

local function check_info(cmd)
  local ok, proc = pcall(vim.system, cmd, { text = true })
  if not ok then
    health.error(('cannot run %s: %s'):format(table.concat(cmd, ' '), proc))
    return
  end
  local result = proc:wait(120000)
  if result.code ~= 0 then
    local stderr = vim.trim(result.stderr or '')
    local last = stderr:match('([^\n]*)$') or stderr
    health.error(('`%s` failed (exit %s): %s'):format(table.concat(cmd, ' '), tostring(result.code), last),
      { 'Run the command in a terminal to see the whole error.',
        'Set `model`, `backend`, `device` or `cmd` in setup{}.' })
    return
  end
  local decoded_ok, info = pcall(vim.json.decode, result.stdout or '')
  if not decoded_ok or type(info) ~= 'table' then
    health.error(('`%s` did not print JSON: %s'):format(table.concat(cmd, ' '), (result.stdout or ''):sub(1, 200)))
    return
  end
  health.ok('server: difill ' .. tostring(info.version))
  health.ok('model: ' .. describe(info))
  if type(info.languages) == 'table' then
    health.info('languages with a syntax grammar: ' .. table.concat(info.languages, ', '))
  end
  return info
end

local function check_running(difill)
  local client = difill.get_client()
  if not client then
    health.info('no server running now (it starts with the first buffer of an enabled language)')
    return
  end
  health.ok(('server running (client id %d), %s'):format(client.id, difill.status()))
  local caps = client.server_capabilities or {}
  if caps.inlineCompletionProvider then
    health.ok('server offers textDocument/inlineCompletion')
  else
    health.warn('server does not announce inlineCompletionProvider')
  end
  local response
  if vim.fn.has('nvim-0.11') == 1 then
    response = client:request_sync('difill/status', vim.empty_dict(), 5000)
  else
    response = client.request_sync('difill/status', vim.empty_dict(), 5000)
  end
  if not response then
    health.warn('difill/status did not answer within 5 s (the model may still be loading)')
  elseif response.err then
    health.warn('difill/status failed: ' .. tostring(response.err.message))
  elseif type(response.result) == 'table' then
    local keys = vim.tbl_keys(response.result)
    table.sort(keys)
    for _, key in ipairs(keys) do
      local value = response.result[key]
      local shown = type(value) == 'table' and vim.inspect(value, { newline = ' ', indent = '' }) or tostring(value)
      health.info(('status %s: %s'):format(key, shown))
    end
  end
end

function M.check()
  health.start('difill')
  if vim.fn.has('nvim-0.10') == 1 then
    health.ok('Neovim ' .. tostring(vim.version()))
  else
    health.error('difill needs Neovim 0.10 or later')
    return
  end
  local difill = require('difill')
  local config_mod = require('difill.config')
  if not difill.config then
    health.warn("setup() has not been called: require('difill').setup{}")
  end
  local config = difill.config or config_mod.resolve({})
  if vim.fn.executable(config.cmd[1]) == 1 then
    health.ok(('server command: %s'):format(table.concat(config_mod.server_cmd(config), ' ')))
  else
    health.error(('%s is not executable'):format(config.cmd[1]),
      { 'pip install difill, or set cmd = { "/path/to/python", "-m", "difill", "serve" } in setup{}' })
    return
  end
  if config.use_builtin and not vim.lsp.inline_completion then
    health.warn('use_builtin needs Neovim 0.12 (vim.lsp.inline_completion); the plugin\'s ghost text is used')
  end
  local languages = config.languages == '*' and 'every filetype' or table.concat(config.languages, ', ')
  health.info('enabled for: ' .. languages)
  check_info(config_mod.info_cmd(config))
  check_running(difill)
end

return M
