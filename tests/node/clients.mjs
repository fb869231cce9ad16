// Real clients against the relay: the Vercel AI SDK's default OpenAI provider (openai(model) calls
// the Responses API) and the official Node openai SDK.  Prints one JSON object: what each read.
import { createOpenAI } from "@ai-sdk/openai";
import { streamText, generateText } from "ai";
import OpenAI from "openai";

const baseURL = process.env.RELAY_BASE_URL;
const model = process.env.RELAY_MODEL;
const out = {};

const provider = createOpenAI({ baseURL, apiKey: "client-side-key" });
const streamed = streamText({ model: provider(model), prompt: "hello from the AI SDK" });
let text = "";
for await (const part of streamed.textStream) text += part;
out.aiStreamText = text;
out.aiFinishReason = await streamed.finishReason;
out.aiUsage = await streamed.usage;
const generated = await generateText({ model: provider(model), prompt: "hello again" });
out.aiGenerateText = generated.text;

const client = new OpenAI({ baseURL, apiKey: "client-side-key", maxRetries: 0 });
let responsesText = "";
const events = [];
for await (const event of await client.responses.create({ model, input: "hello from node", stream: true })) {
  events.push(event.type);
  if (event.type === "response.output_text.delta") responsesText += event.delta;
}
out.nodeResponsesText = responsesText;
out.nodeResponsesFirst = events[0];
out.nodeResponsesLast = events[events.length - 1];
let chatText = "";
for await (const chunk of await client.chat.completions.create({
  model, messages: [{ role: "user", content: "hello chat" }], stream: true })) {
  chatText += chunk.choices[0]?.delta?.content ?? "";
}
out.nodeChatText = chatText;
try {
  await client.embeddings.create({ model, input: "x" });
  out.notFound = "no error";
} catch (err) {
  out.notFound = `${err.status} ${err.message}`;
}
console.log(JSON.stringify(out));
