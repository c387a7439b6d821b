/**
 * How the language client starts and talks to `difill serve`. Plain data and functions only
 * (types are imported with `import type`, which compiles away), so that the unit tests can check
 * the server command, the document selector and the configuration answers under plain Node.
 */
import type { Executable, LanguageClientOptions } from 'vscode-languageclient/node';
import { DifillConfiguration, serverSettings } from './settings';

export interface DocumentFilter {
  scheme: string;
  language?: string;
}

/** The command line of the server: `difill serve` plus the logging options. LSP goes over stdio. */
export function serverExecutable(config: DifillConfiguration, env: NodeJS.ProcessEnv = process.env): Executable {
  const args = [...config.serverArgs, '--log-level', config.logLevel];
  if (config.logFile) {
    args.push('--log-file', config.logFile);
  }
  return {
    command: config.serverPath,
    args,
    // Unbuffered output so that the log reaches the output channel as it happens.
    options: { env: { ...env, PYTHONUNBUFFERED: '1' } },
  };
}

/** Saved files and untitled buffers of the enabled languages; ["*"] enables every language. */
export function documentSelector(config: DifillConfiguration): DocumentFilter[] {
  const schemes = ['file', 'untitled'];
  if (config.languages.includes('*')) {
    return schemes.map((scheme) => ({ scheme }));
  }
  return config.languages.flatMap((language) => schemes.map((scheme) => ({ scheme, language })));
}

/**
 * The answer to a workspace/configuration request: the server asks for the `difill` section (or
 * one key of it) and gets its own key names, not VS Code's.
 */
export function configurationAnswer(config: DifillConfiguration, items: { section?: string }[]): unknown[] {
  const settings = serverSettings(config) as unknown as Record<string, unknown>;
  return items.map((item) => {
    if (item.section === 'difill') {
      return settings;
    }
    if (item.section?.startsWith('difill.')) {
      return settings[item.section.slice('difill.'.length)] ?? null;
    }
    return null;
  });
}

/**
 * Options of the LanguageClient. `current` returns the configuration in force, so that the
 * middleware answers with the latest settings after a change without rebuilding the client.
 */
export function clientOptions(
  current: () => DifillConfiguration,
  onInitializationFailed: (message: string) => void,
): LanguageClientOptions {
  const config = current();
  return {
    documentSelector: documentSelector(config),
    initializationOptions: serverSettings(config),
    outputChannelName: 'difill',
    initializationFailedHandler: (error) => {
      onInitializationFailed(error instanceof Error ? error.message : String(error));
      return false; // a server that cannot start will not start on a retry either
    },
    middleware: {
      workspace: {
        configuration: (params) => configurationAnswer(current(), params.items),
      },
    },
  };
}
