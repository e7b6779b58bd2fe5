export function describe(config) {
  return `tags: ${config.tags.join(", ")}`;
}
