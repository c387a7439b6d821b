/**
 * difill for VS Code: starts `difill serve` through vscode-languageclient, which registers the
 * server's textDocument/inlineCompletion as VS Code's inline suggestions (ghost text: Tab
 * accepts, Ctrl+Right accepts a word, Alt+] / Alt+[ cycle, Escape dismisses).
 *
 * This file is the only one that touches the `vscode` API; the decisions (settings mapping,
 * server command, document selector, status text) live in plain modules with unit tests.
 */
import * as vscode from 'vscode';
import { LanguageClient, State } from 'vscode-languageclient/node';
import { clientOptions, serverExecutable } from './clientOptions';
import { DifillConfiguration, needsRestart, readConfiguration, serverSettings } from './settings';
import { describeProblem, describeStatus, StatusView } from './status';

const STATUS_POLL_MS = 1000;

class DifillExtension implements vscode.Disposable {
  private client: LanguageClient | undefined;
  private config: DifillConfiguration;
  private readonly statusItem: vscode.StatusBarItem;
  private readonly output: vscode.LogOutputChannel;
  private pollTimer: NodeJS.Timeout | undefined;
  private readonly disposables: vscode.Disposable[] = [];

  constructor() {
    this.config = this.read();
    this.output = vscode.window.createOutputChannel('difill', { log: true });
    this.statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
    this.statusItem.command = 'difill.showStatus';
    this.statusItem.show();
    this.disposables.push(
      this.output,
      this.statusItem,
      vscode.workspace.onDidChangeConfiguration((event) => {
        if (event.affectsConfiguration('difill')) {
          void this.onConfigurationChanged();
        }
      }),
      vscode.commands.registerCommand('difill.restart', () => this.restart()),
      vscode.commands.registerCommand('difill.showStatus', () => this.showStatus()),
      vscode.commands.registerCommand('difill.toggle', () =>
        vscode.workspace.getConfiguration('difill').update('enable', !this.config.enable, vscode.ConfigurationTarget.Global)),
    );
  }

  /** Read the settings; bad values are reported once and replaced by their defaults. */
  private read(): DifillConfiguration {
    const section = vscode.workspace.getConfiguration('difill');
    const { config, warnings } = readConfiguration((key) => section.get(key));
    for (const warning of warnings) {
      void vscode.window.showWarningMessage(warning);
    }
    return config;
  }

  private show(view: StatusView): void {
    this.statusItem.text = view.text;
    this.statusItem.tooltip = view.tooltip;
    this.statusItem.backgroundColor =
      view.kind === 'error' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  }

  async start(): Promise<void> {
    if (!this.config.enable) {
      this.show(describeProblem('disabled'));
      return;
    }
    this.show(describeProblem('starting'));
    const executable = serverExecutable(this.config);
    const client = new LanguageClient(
      'difill',
      'difill',
      { run: executable, debug: executable },
      {
        ...clientOptions(
          () => this.config,
          (message) => this.show(describeProblem('error', `the server did not start: ${message}`)),
        ),
        outputChannel: this.output,
      },
    );
    this.client = client;
    client.onDidChangeState((event) => {
      if (event.newState === State.Stopped && this.client === client) {
        this.stopPolling();
        this.show(describeProblem('stopped', `see the "difill" output channel`));
      }
    });
    try {
      await client.start();
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      this.show(describeProblem('error', `cannot start ${executable.command}: ${message}`));
      void vscode.window.showErrorMessage(
        `difill: cannot start "${executable.command}" (${message}). Set difill.serverPath to the difill executable.`,
      );
      return;
    }
    this.startPolling();
  }

  async stop(): Promise<void> {
    this.stopPolling();
    const client = this.client;
    this.client = undefined;
    if (client) {
      try {
        await client.stop();
      } catch (error) {
        this.output.warn(`stopping the server: ${error}`);
      }
    }
  }

  async restart(): Promise<void> {
    await this.stop();
    this.config = this.read();
    await this.start();
  }

  private async onConfigurationChanged(): Promise<void> {
    const before = this.config;
    const after = this.read();
    if (needsRestart(before, after)) {
      await this.restart();
      return;
    }
    this.config = after;
    if (this.client?.isRunning()) {
      await this.client.sendNotification('workspace/didChangeConfiguration', {
        settings: { difill: serverSettings(after) },
      });
      this.startPolling(); // a new model path, backend or device loads a model again
    }
  }

  /** Ask difill/status every second while the model loads, then stop asking. */
  private startPolling(): void {
    this.stopPolling();
    const poll = async () => {
      const view = await this.queryStatus();
      if (view) {
        this.show(view);
      }
      if (!view || view.kind === 'loading') {
        this.pollTimer = setTimeout(poll, STATUS_POLL_MS);
      } else {
        this.pollTimer = undefined;
      }
    };
    void poll();
  }

  private stopPolling(): void {
    if (this.pollTimer) {
      clearTimeout(this.pollTimer);
      this.pollTimer = undefined;
    }
  }

  private async queryStatus(): Promise<StatusView | undefined> {
    const client = this.client;
    if (!client?.isRunning()) {
      return undefined;
    }
    try {
      return describeStatus(await client.sendRequest('difill/status', {}));
    } catch (error) {
      this.output.warn(`difill/status failed: ${error}`);
      return undefined;
    }
  }

  private async showStatus(): Promise<void> {
    const client = this.client;
    if (!client?.isRunning()) {
      void vscode.window.showInformationMessage(
        this.config.enable ? 'difill: the server is not running (difill: Restart Server)' : 'difill is disabled (difill.enable)');
      return;
    }
    try {
      const status = await client.sendRequest('difill/status', {});
      this.show(describeStatus(status));
      this.output.info(`difill/status: ${JSON.stringify(status, null, 2)}`);
      this.output.show(true);
    } catch (error) {
      void vscode.window.showErrorMessage(`difill/status failed: ${error}`);
    }
  }

  dispose(): void {
    void this.stop();
    for (const disposable of this.disposables) {
      disposable.dispose();
    }
  }
}

let extension: DifillExtension | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  extension = new DifillExtension();
  context.subscriptions.push(extension);
  await extension.start();
}

export async function deactivate(): Promise<void> {
  await extension?.stop();
  extension = undefined;
}
